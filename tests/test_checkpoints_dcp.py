"""torch.distributed.checkpoint folders into .slim files: the model's tensors of an FSDP2 checkpoint written by 2
ranks (uneven shards) and of a 1-process dcp.save, read one at a time without a process group, compressed and
decompressed within the quantization bound; damaged or forged folders refused with the file named."""

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import MetadataIndex

from slimrate import SlimFile
from slimrate.checkpoints_dcp import METADATA_FILE, dcp_tensors, iter_dcp_checkpoint
from slimrate.cli import main
from slimrate.cli.model_files import SOURCE_KEY
from slimrate.train.checkpoint import write_manifest
from slimrate.train.sharded_checkpoint import SHARDED_FORMAT

from helpers import finish_process, start_process, start_torchrun

# the tests' own 1-process dcp.save calls: no process group is the point
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SCRIPT = Path(__file__).with_name("fsdp_save_script.py")
MAX_ERROR = 1e-3



@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """"fsdp": written by 2 FSDP2 ranks (rows 11 → 6 + 5), "single": by one process; each holds dcp/ and the full
    model state dict full.safetensors."""
    root = tmp_path_factory.mktemp("dcp")
    fsdp = start_torchrun([str(SCRIPT), "--out", str(root / "fsdp")])
    single = start_process([sys.executable, str(SCRIPT), "--out", str(root / "single"), "--layers", "3"])
    finish_process(fsdp, "torchrun --nproc_per_node=2 fsdp_save_script.py")
    finish_process(single, "fsdp_save_script.py")
    return {"fsdp": root / "fsdp", "single": root / "single"}


def copy_of(saved: dict[str, Path], tmp_path: Path, which: str = "fsdp") -> Path:
    return Path(shutil.copytree(saved[which] / "dcp", tmp_path / which))


@pytest.mark.parametrize("which", ["fsdp", "single"])
def test_reading_gives_the_full_model_state_dict_without_the_optimizer(saved, which):
    full = load_file(saved[which] / "full.safetensors")
    got = dict(iter_dcp_checkpoint(saved[which] / "dcp"))
    assert sorted(got) == sorted(full)  # the optimizer's moments are in the folder too, and left out
    for name, tensor in full.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    if which == "fsdp":
        assert [len(t.chunks) for t in dcp_tensors(saved[which] / "dcp").values()] == [2] * len(full)


@pytest.mark.parametrize("which", ["fsdp", "single"])
def test_compress_and_decompress_give_the_model_within_the_bound(saved, which, tmp_path, capsys):
    slim, out = tmp_path / "m.slim", tmp_path / "out.safetensors"
    assert main(["compress", str(saved[which] / "dcp"), "-o", str(slim), "--max-error", str(MAX_ERROR)]) == 0
    assert main(["decompress", str(slim), "-o", str(out)]) == 0
    full, got = load_file(saved[which] / "full.safetensors"), load_file(out)
    assert sorted(got) == sorted(full)
    for name, tensor in full.items():
        bound = MAX_ERROR if tensor.dim() >= 2 else 0  # 1-D tensors are stored losslessly
        error = (got[name].double() - tensor.double()).abs().max().item()
        assert error <= bound * (1 + 1e-6), f"{name}: max error {error:.3g} > {bound}"
        assert tensor.dim() < 2 or error > 0, f"{name}: not quantized"
    with SlimFile(slim) as f:
        assert json.loads(f.metadata()[SOURCE_KEY]) == {"format": "torch.distributed.checkpoint", "folder": "dcp"}


def test_a_flat_state_dict_is_read_whole_with_its_keys(tmp_path):
    """dcp.save(model.state_dict()) of a Hugging Face-like model: "model." is part of the names, not a nesting;
    int and bool tensors come back exactly."""
    state = {"model.embed.weight": torch.randn(6, 4), "lm_head.weight": torch.randn(3, 4),
             "model.count": torch.randint(-5, 5, (7,)), "model.mask": torch.rand(5) > 0.5}
    dcp.save(state, checkpoint_id=tmp_path / "flat", no_dist=True)
    got = dict(iter_dcp_checkpoint(tmp_path / "flat"))
    assert list(got) == list(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
    assert main(["compress", str(tmp_path / "flat"), "-o", str(tmp_path / "m.slim"), "--step", "0.01"]) == 0
    with SlimFile(tmp_path / "m.slim") as f:
        assert torch.equal(f.get_tensor("model.count"), state["model.count"])
        assert torch.equal(f.get_tensor("model.mask"), state["model.mask"])


def test_a_verified_manifest_gives_the_step_and_a_damaged_file_is_refused_before_reading(saved, tmp_path, capsys):
    folder = copy_of(saved, tmp_path)
    for name in ("tensors.safetensors", "state.json"):  # the training loop's other files (compress skips them)
        (folder / name).write_bytes(b"{}")
    files = tuple(sorted(p.name for p in folder.iterdir()))
    write_manifest(folder, SHARDED_FORMAT, 1, files, step=7, world_size=2)
    assert main(["compress", str(folder), "-o", str(tmp_path / "m.slim"), "--step", "0.01"]) == 0
    with SlimFile(tmp_path / "m.slim") as f:
        assert json.loads(f.metadata()[SOURCE_KEY])["step"] == 7
    capsys.readouterr()
    (folder / METADATA_FILE).write_bytes(pickle.dumps({"not": "checked"}))
    assert main(["compress", str(folder), "-o", str(tmp_path / "n.slim"), "--step", "0.01"]) == 2
    assert f"{folder / METADATA_FILE}: SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "n.slim").exists()


def test_a_folder_of_training_checkpoints_is_refused_naming_its_newest(saved, tmp_path, capsys):
    for step in (5, 10):
        shutil.copytree(saved["fsdp"] / "dcp", tmp_path / "checkpoints" / f"step-{step:08d}")
    assert main(["compress", str(tmp_path / "checkpoints"), "-o", str(tmp_path / "m.slim"), "--step", "0.1"]) == 2
    assert capsys.readouterr().err.endswith(f"pass one of its step folders, e.g. the newest: "
                                            f"{tmp_path / 'checkpoints' / 'step-00000010'}\n")


class Forged:
    """A .metadata that runs code when torch's own reader unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_metadata_pickle_that_would_run_code_is_refused_unrun(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / METADATA_FILE).write_bytes(pickle.dumps(Forged(tmp_path / "ran")))
    with pytest.raises(ValueError, match=r"\.metadata: not a torch.distributed.checkpoint .metadata file .*mkdir"):
        dcp_tensors(folder)
    assert not (tmp_path / "ran").exists()


def _metadata(folder: Path):
    with open(folder / METADATA_FILE, "rb") as f:
        return pickle.load(f)  # the test's own file: trusted


def _rewrite(folder: Path, metadata) -> None:
    (folder / METADATA_FILE).write_bytes(pickle.dumps(metadata))


def _weight(metadata):
    return metadata.state_dict_metadata["model.1.weight"]  # (11, 10), rows 0..5 on rank 0, 6..10 on rank 1


def _drop_a_chunk(md):
    _weight(md).chunks.pop()


def _overlap_chunks(md):
    """Rank 1's chunk moved up a row (same element count): row 5 twice, row 10 never."""
    chunk = _weight(md).chunks[1]
    info = next(v for k, v in md.storage_data.items() if k.fqn == "model.1.weight" and k.offset == chunk.offsets)
    _weight(md).chunks[1] = dataclasses.replace(chunk, offsets=torch.Size([5, 0]))
    md.storage_data[MetadataIndex("model.1.weight", [5, 0])] = info


def _grow_past_the_tensor(md):
    _weight(md).chunks[1] = dataclasses.replace(_weight(md).chunks[1], sizes=torch.Size([6, 10]))


def _point_outside_the_folder(md):
    next(iter(md.storage_data.values())).relative_path = "../elsewhere.distcp"


def _share_a_byte_range(md):
    infos = list(md.storage_data.values())
    infos[1].offset = infos[0].offset


def _add_a_transform(md):
    next(iter(md.storage_data.values())).transform_descriptors = ["zstd"]


def _not_metadata(md):
    return {"state_dict_metadata": md.state_dict_metadata}


@pytest.mark.parametrize("forge, message", [
    (_drop_a_chunk, r"model.1.weight'?: its chunks hold 60 elements, the tensor 110 .*do not cover it"),
    (_overlap_chunks, r"chunk at \[5, 0\] overlaps another of its chunks"),
    (_grow_past_the_tensor, r"does not lie inside it"),
    (_point_outside_the_folder, r"is not a chunk's file and byte range in the folder"),
    (_share_a_byte_range, r"overlap in __0_0.distcp"),
    (_add_a_transform, r"stored through \['zstd'\]"),
    (_not_metadata, r"it holds a dict, expected DCP's Metadata"),
], ids=lambda case: case.__name__[1:] if callable(case) else "")
def test_forged_metadata_is_refused_naming_the_file(saved, tmp_path, forge, message):
    folder = copy_of(saved, tmp_path)
    metadata = _metadata(folder)
    _rewrite(folder, forge(metadata) or metadata)
    with pytest.raises(ValueError, match=message) as error:
        dict(iter_dcp_checkpoint(folder))
    assert str(folder) in str(error.value)


def _truncate_metadata(folder: Path):
    data = (folder / METADATA_FILE).read_bytes()
    (folder / METADATA_FILE).write_bytes(data[:len(data) // 2])


def _remove_rank_1(folder: Path):
    (folder / "__1_0.distcp").unlink()


def _truncate_rank_1(folder: Path):
    os.truncate(folder / "__1_0.distcp", 1000)  # its model chunks come first; only what is read must be there


def _flip_a_byte_of_the_data(folder: Path):
    """The first byte of a weight's values in rank 0's file: torch.load alone would load a wrong value."""
    chunk = dcp_tensors(folder)["1.weight"].chunks[0]
    data = bytearray((folder / "__0_0.distcp").read_bytes())
    saved = bytes(data[chunk.offset:chunk.offset + chunk.length])
    record = next(i for i in zipfile.ZipFile(io.BytesIO(saved)).infolist() if i.filename.endswith("/data/0"))
    name_nbytes, extra_nbytes = struct.unpack_from("<HH", saved, record.header_offset + 26)  # zip local header
    data[chunk.offset + record.header_offset + 30 + name_nbytes + extra_nbytes] ^= 0x55
    (folder / "__0_0.distcp").write_bytes(data)


def _garbage_chunk(folder: Path):
    chunk = dcp_tensors(folder)["1.weight"].chunks[1]
    data = bytearray((folder / "__1_0.distcp").read_bytes())
    data[chunk.offset:chunk.offset + chunk.length] = b"x" * chunk.length
    (folder / "__1_0.distcp").write_bytes(data)


@pytest.mark.parametrize("damage, where, message", [
    (_truncate_metadata, METADATA_FILE, r"not a torch.distributed.checkpoint .metadata file \((EOFError|Unpickling)"),
    (_remove_rank_1, "__1_0.distcp", r"missing; .metadata stores \d+ chunks there"),
    (_truncate_rank_1, "__1_0.distcp", r"truncated: .metadata stores a chunk of tensor"),
    (_flip_a_byte_of_the_data, "__0_0.distcp", r"CRC-32 mismatch"),
    (_garbage_chunk, "__1_0.distcp", r"not a saved tensor"),
], ids=lambda case: case.__name__[1:] if callable(case) else "")
def test_damaged_files_are_refused_on_the_command_line_naming_the_file(saved, tmp_path, capsys, damage, where,
                                                                       message):
    folder = copy_of(saved, tmp_path)
    damage(folder)
    assert main(["compress", str(folder), "-o", str(tmp_path / "m.slim"), "--step", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slimrate compress: {folder / where}: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "m.slim").exists()


def test_a_dtype_slim_does_not_store_is_refused_naming_the_tensor(tmp_path, capsys):
    dcp.save({"model": {"w": torch.randn(3, 4), "z": torch.randn(2, dtype=torch.complex64)}},
             checkpoint_id=tmp_path / "c", no_dist=True)
    assert main(["compress", str(tmp_path / "c"), "-o", str(tmp_path / "m.slim"), "--step", "0.01"]) == 2
    assert "complex64" in capsys.readouterr().err

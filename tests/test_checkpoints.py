"""Hugging Face safetensors checkpoints (slimrate.checkpoints): the streaming writer against safetensors' reader and
transformers' from_pretrained, sharding against huggingface_hub's splitter, the reader on files, folders and
transformers' sharded folders, clear errors for damaged folders, and a model folder's small files."""

import json
import os
import stat
import weakref
from functools import partial
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimrate import checkpoints
from slimrate.checkpoints import (
    INDEX_FILE,
    MODEL_FILES_KEY,
    SAFETENSORS_DTYPES,
    checkpoint_files,
    checkpoint_metadata,
    decode_model_files,
    encode_model_files,
    iter_checkpoint,
    model_folder_files,
    parse_size,
    write_checkpoint,
    write_model_files,
)
from slimrate.files import StagedWrites

SHAPES = [(3, 7), (), (1,), (0, 4), (2, 1, 5)]


def random_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape).to(dtype)
    return torch.randint(0, 100, shape).to(dtype)  # 0..99 fits every integer dtype, signed or not


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: compares every dtype exactly (float8 and uint64 have no torch.equal; NaN ≠ NaN)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(t)), name


def items_of(state: dict) -> list[tuple]:
    return [(name, t.shape, t.dtype, partial(lambda t: t, t)) for name, t in state.items()]


def random_state(names=("a", "b", "c", "d", "e", "f"), nbytes=(40, 40, 100, 8, 8, 32)) -> dict:
    return {name: torch.randn(n // 4) for name, n in zip(names, nbytes, strict=True)}


@pytest.mark.parametrize("code", SAFETENSORS_DTYPES)
def test_write_checkpoint_round_trips_every_dtype_through_safetensors(tmp_path, code):
    dtype = SAFETENSORS_DTYPES[code]
    state = {f"t{i}": random_tensor(shape, dtype) for i, shape in enumerate(SHAPES)}
    metadata = {"format": "pt", "note": "ünïcode"}
    file = tmp_path / "m.safetensors"
    assert write_checkpoint(items_of(state), file, metadata=metadata) == [file]
    assert_same_tensors(load_file(tmp_path / "m.safetensors"), state)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == metadata
    data = (tmp_path / "m.safetensors").read_bytes()
    assert int.from_bytes(data[:8], "little") % 8 == 0 and data[8:9] == b"{"


@pytest.mark.parametrize("code", SAFETENSORS_DTYPES)
def test_iter_checkpoint_reads_what_safetensors_writes(tmp_path, code):
    state = {f"t{i}": random_tensor(shape, SAFETENSORS_DTYPES[code]) for i, shape in enumerate(SHAPES)}
    save_file(state, tmp_path / "m.safetensors", metadata={"k": "v"})
    got = dict(iter_checkpoint(tmp_path / "m.safetensors"))
    assert_same_tensors({name: got[name] for name in state}, state)
    assert checkpoint_metadata(tmp_path / "m.safetensors") == {"k": "v"}


def test_write_checkpoint_accepts_dtype_names(tmp_path):
    state = {"w": torch.randn(4, 3).bfloat16()}
    write_checkpoint([("w", (4, 3), "bfloat16", lambda: state["w"])], tmp_path / "m.safetensors")
    assert_same_tensors(load_file(tmp_path / "m.safetensors"), state)


def test_shards_split_like_huggingface_hub(tmp_path):
    """huggingface_hub's splitter (what save_pretrained uses) is the reference, on tensors no larger than a shard."""
    sizes = (10 * torch.randint(1, 4, (40,))).tolist()  # multiples of 10 floats: shards often fill exactly
    state = {f"layer{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}
    limit = 4 * 60
    files = write_checkpoint(items_of(state), tmp_path, max_shard_size=limit)
    split = split_torch_state_dict_into_shards(state, max_shard_size=limit)
    assert [f.name for f in files] == [*split.filename_to_tensors, INDEX_FILE]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index == {"metadata": {"total_size": 4 * sum(sizes)}, "weight_map": split.tensor_to_filename}
    for file in files[:-1]:
        assert list(load_file(file)) == split.filename_to_tensors[file.name]
    assert_same_tensors(dict(iter_checkpoint(tmp_path)), state)


def test_a_tensor_larger_than_a_shard_gets_a_shard_of_its_own(tmp_path):
    state = random_state()  # 40, 40, 100, 8, 8, 32 bytes
    files = write_checkpoint(items_of(state), tmp_path / "out", max_shard_size=80)
    assert [list(load_file(f)) for f in files[:-1]] == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert [f.name for f in files] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + [INDEX_FILE]


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    state = random_state()
    assert write_checkpoint(items_of(state), tmp_path, metadata={"format": "pt"}) == [tmp_path / "model.safetensors"]
    assert_same_tensors(load_file(tmp_path / "model.safetensors"), state)
    assert checkpoint_metadata(tmp_path) == {"format": "pt"}


def test_an_empty_checkpoint_is_a_valid_file(tmp_path):
    write_checkpoint([], tmp_path / "m.safetensors")
    assert load_file(tmp_path / "m.safetensors") == {}


def test_each_tensor_is_produced_when_written_and_released_after(tmp_path):
    state = random_state()
    calls, alive = [], []

    def produce(name):
        calls.append(name)
        assert not any(ref() is not None for ref in alive), "the previous tensor's memory is still held"
        memory = state[name].numpy().copy()  # the tensor's memory, as an object a weakref can follow
        alive.append(weakref.ref(memory))
        return torch.from_numpy(memory)

    write_checkpoint([(n, t.shape, t.dtype, partial(produce, n)) for n, t in state.items()], tmp_path,
                     max_shard_size=90)
    assert calls == list(state)
    assert_same_tensors(dict(iter_checkpoint(tmp_path)), state)


def resident_mib() -> float:
    """This process's resident memory now (not its peak), MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from Linux's /proc")
def test_reading_and_writing_hold_a_few_tensors_not_the_file(tmp_path):
    """40 tensors of 4 MiB (160 MiB): resident memory grows by a few tensors while the file is written and while it
    is read back and every byte touched (memory maps released as tensors go)."""
    tensor_mib, count = 4, 40
    shape = (1024, tensor_mib * 2**20 // 2048)  # bf16
    start, growth = resident_mib(), []

    def produce():
        growth.append(resident_mib() - start)
        return torch.empty(shape, dtype=torch.bfloat16).normal_()

    write_checkpoint([(f"w{i}", shape, torch.bfloat16, produce) for i in range(count)], tmp_path / "m.safetensors")
    start = resident_mib()
    for _, t in iter_checkpoint(tmp_path / "m.safetensors"):
        assert t.abs().sum(dtype=torch.float32) > 0  # reads every byte
        growth.append(resident_mib() - start)
    bound = count // 2 * tensor_mib  # half the file; measured: 12 to 33 MiB
    assert max(growth) < bound < count * tensor_mib, f"resident memory grew by {max(growth):.0f} MiB"


def test_rewriting_a_folder_removes_the_weights_of_the_earlier_save(tmp_path):
    state = random_state()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"kept")
    write_checkpoint(items_of(state), tmp_path)
    write_checkpoint(items_of(state), tmp_path, max_shard_size=90)
    assert not (tmp_path / "model.safetensors").exists()
    state["a"] = torch.randn(10)
    write_checkpoint(items_of(state), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "config.json",
                                                          "model.safetensors"]
    assert_same_tensors(dict(iter_checkpoint(tmp_path)), state)


@pytest.mark.parametrize("fail_at", ["b", "f"])
def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path, fail_at):
    state = random_state()
    write_checkpoint(items_of(state), tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    items = [(n, t.shape, t.dtype, partial(lambda n, t: torch.zeros(2) if n == fail_at else t, n, t))
             for n, t in state.items()]
    with pytest.raises(ValueError, match=rf"tensor '{fail_at}': produce\(\) returned \(2,\) torch.float32, the "
                                         rf"header promised \(\d+,\) torch.float32"):
        write_checkpoint(items, tmp_path, max_shard_size=90)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_staged_writes_replace_every_target_or_none(tmp_path):
    (tmp_path / "a").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="stop"), StagedWrites() as staged:
        with staged.open(tmp_path / "a") as f:
            f.write(b"new")
        raise RuntimeError("stop")
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and (tmp_path / "a").read_bytes() == b"old"
    with StagedWrites() as staged:
        for name in "ab":
            with staged.open(tmp_path / name) as f:
                f.write(name.encode())
        assert (tmp_path / "a").read_bytes() == b"old"
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == [b"a", b"b"]


@pytest.mark.parametrize("size,nbytes", [(123, 123), ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("10kb", 10**4),
                                         ("2GiB", 2 * 2**30), ("64MiB", 64 * 2**20), ("8KiB", 8192), ("77", 77)])
def test_parse_size_reads_transformers_units(size, nbytes):
    assert parse_size(size) == nbytes


@pytest.mark.parametrize("size", ["5XB", "GB", "1.5GB", "-1", 0, "0MB", True, 2.5])
def test_parse_size_rejects_other_values(size):
    with pytest.raises(ValueError, match="max_shard_size: expected"):
        parse_size(size)


@pytest.mark.parametrize("items,error,match", [
    ([("__metadata__", (2,), torch.float32, lambda: torch.randn(2))], ValueError, "reserved by safetensors"),
    ([("w", (2,), torch.float32, torch.randn)] * 2, ValueError, "'w' appears twice"),
    ([("w", (2,), torch.complex128, torch.randn)], TypeError, "a dtype safetensors stores"),
    ([("w", (2,), "float33", torch.randn)], TypeError, "a dtype safetensors stores"),
    ([("w", (2,), torch.float32, None)], TypeError, "a callable produce"),
    ([("w", (2, -1), torch.float32, torch.randn)], TypeError, r"items\[0\] \('w'\): shape"),
    ([("w", torch.randn(2))], TypeError, r"items\[0\]: expected \(name, shape, dtype, produce\)"),
], ids=["reserved", "duplicate", "dtype", "dtype-name", "produce", "shape", "pair"])
def test_write_checkpoint_rejects_bad_items_before_writing(tmp_path, items, error, match):
    with pytest.raises(error, match=match):
        write_checkpoint(items, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_write_checkpoint_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="metadata: expected a dict of str"):
        write_checkpoint([], tmp_path / "m.safetensors", metadata={"n": 1})


# --- transformers -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama saved by transformers in three shards, with its config files."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="10KB")
    return model, folder


def test_iter_checkpoint_reads_a_transformers_sharded_folder(llama):
    model, folder = llama
    shards = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
    assert checkpoint_files(folder) == [folder / shard for shard in shards] and len(shards) == 3
    got = dict(iter_checkpoint(folder))
    assert_same_tensors({name: got[name] for name in model.state_dict()}, model.state_dict())
    assert sorted(got) == sorted(model.state_dict())
    assert checkpoint_metadata(folder) == {"format": "pt"}


@pytest.mark.parametrize("max_shard_size", ["5GB", "8KB"])
def test_from_pretrained_loads_what_write_checkpoint_writes(llama, tmp_path, max_shard_size):
    from transformers import AutoModelForCausalLM

    model, folder = llama
    items = [(name, t.shape, t.dtype, partial(lambda t: t, t)) for name, t in iter_checkpoint(folder)]
    written = write_checkpoint(items, tmp_path, max_shard_size=max_shard_size, metadata=checkpoint_metadata(folder))
    write_model_files(tmp_path, model_folder_files(folder))
    assert (written[-1].name == INDEX_FILE) == (max_shard_size == "8KB") and written[0].parent == tmp_path
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


# --- bad checkpoints ----------------------------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path) -> Path:
    """A folder of three shards (a, b | c | d, e, f) and its index."""
    write_checkpoint(items_of(random_state()), tmp_path / "ckpt", max_shard_size=90, metadata={"format": "pt"})
    return tmp_path / "ckpt"


def edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / INDEX_FILE).read_text())
    edit(index["weight_map"])
    (folder / INDEX_FILE).write_text(json.dumps(index))


SHARD2, SHARD3 = "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"


def damage(folder: Path, how: str) -> None:
    shard = folder / SHARD2
    if how == "missing-shard":
        shard.unlink()
    elif how == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-5])
    elif how == "padded-shard":
        shard.write_bytes(shard.read_bytes() + b"\0")
    elif how == "index-names-missing-tensor":
        edit_index(folder, lambda m: m.update(ghost=SHARD2))
    elif how == "index-names-missing-file":
        edit_index(folder, lambda m: m.update(ghost="model-00009-of-00009.safetensors"))
    elif how == "index-leaves-a-tensor-out":
        edit_index(folder, lambda m: m.pop("e"))
    elif how == "index-outside-folder":
        edit_index(folder, lambda m: m.update(c="../" + SHARD2))
    elif how == "index-not-json":
        (folder / INDEX_FILE).write_text("{not json")


FOLDER_DAMAGES = {
    "missing-shard": f"{SHARD2}: missing; {INDEX_FILE} names it for 1 tensors ('c', ...)",
    "truncated-shard": f"{SHARD2}: truncated: its header describes",
    "padded-shard": f"{SHARD2}: not a valid safetensors file (1 bytes after the last tensor's data)",
    "index-names-missing-tensor": f"{INDEX_FILE}: names tensor 'ghost' in {SHARD2}, which does not hold it",
    "index-names-missing-file": "model-00009-of-00009.safetensors: missing",
    "index-leaves-a-tensor-out": f"{SHARD3}: holds tensor 'e', which {INDEX_FILE} does not list",
    "index-outside-folder": "weight_map must map tensor names to shard files inside",
    "index-not-json": f"{INDEX_FILE}: not a safetensors index",
}


@pytest.mark.parametrize("reader", [checkpoint_files, checkpoint_metadata, lambda src: list(iter_checkpoint(src))],
                         ids=["files", "metadata", "iter"])
@pytest.mark.parametrize("how", FOLDER_DAMAGES)
def test_damaged_sharded_folders_are_refused_naming_the_file(sharded, reader, how):
    damage(sharded, how)
    with pytest.raises(ValueError, match=FOLDER_DAMAGES[how].replace("(", r"\(").replace(")", r"\)")):
        reader(sharded)


def test_an_index_file_can_be_given_instead_of_its_folder(sharded):
    assert checkpoint_files(sharded / INDEX_FILE) == checkpoint_files(sharded) == [
        sharded / f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]


def write_header(path: Path, header: dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"abc"), "not a valid safetensors file \\(3 bytes, shorter than the 8-byte"),
    (lambda p: p.write_bytes(b"x" * 40), "not a valid safetensors file \\(a header of"),
    (lambda p: p.write_bytes(b"\x02" + bytes(7) + b"[]"), "the header is not a JSON object"),
    (lambda p: p.write_bytes(b"\x03" + bytes(7) + b"{{{"), "the header is not JSON"),
    (lambda p: write_header(p, {"w": {"dtype": "F32", "shape": [2]}}), "tensor 'w': expected dtype, shape and"),
    (lambda p: write_header(p, {"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}), "tensor 'w'"),
    (lambda p: write_header(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     r"data_offsets \[0, 8\] do not hold \[3\] × F32"),
    (lambda p: write_header(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
     "tensors overlap or leave a hole"),
    (lambda p: write_header(p, {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor 'w': expected dtype, shape and"),
    (lambda p: write_header(p, {"w": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor 'w': expected dtype, shape and"),
    (lambda p: write_header(p, {"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}),
     "tensor 'w': expected dtype, shape and"),
    (lambda p: write_header(p, {"w": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}),
     "tensor 'w': expected dtype, shape and"),
    (lambda p: write_header(p, {"__metadata__": {"n": 1}}), "__metadata__ is not an object of strings"),
    (lambda p: write_header(p, {}), "no tensors, nothing to read"),
], ids=["short", "header-length", "not-object", "not-json", "entry-keys", "dtype", "offsets", "overlap",
        "dtype-list", "dtype-object", "dim-beyond-int64", "dim-beyond-uint64", "metadata", "no-tensors"])
def test_malformed_files_are_refused_naming_the_file(tmp_path, make, match):
    path = tmp_path / "m.safetensors"
    make(path)
    with pytest.raises(ValueError, match=f"{path}: .*{match}"):
        checkpoint_files(path)


def test_a_file_damaged_after_its_header_check_is_refused_naming_it(tmp_path, monkeypatch):
    """safetensors' own errors (here: the header the check passed is replaced before the tensor is read) come
    back as ValueError naming the file, like every other read error."""
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(3)}, path)
    monkeypatch.setattr(checkpoints, "safetensors_header", lambda file: (
        path.write_bytes(b"\x02" + bytes(7) + b"[]"), checkpoints.Header({"w": {}}, {}))[1])
    with pytest.raises(ValueError, match=f"{path}: not a valid safetensors file"):
        list(iter_checkpoint(path))


def test_sources_that_are_not_safetensors_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=f"{tmp_path}: no .safetensors files in the folder; pytorch_model.bin: "
                                         "pickle checkpoints are not read"):
        checkpoint_files(tmp_path)
    with pytest.raises(ValueError, match="pytorch_model.bin: pickle checkpoints are not read"):
        checkpoint_files(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="nope: no such file or folder"):
        checkpoint_files(tmp_path / "nope")
    with pytest.raises(TypeError, match="src: expected a path or a list of paths"):
        checkpoint_files(7)


def test_a_folder_is_read_in_from_pretrained_order_of_preference(sharded):
    """model.safetensors wins over an index beside it, as in transformers' from_pretrained."""
    save_file({"w": torch.randn(2)}, sharded / "model.safetensors")
    assert checkpoint_files(sharded) == [sharded / "model.safetensors"]


def test_a_folder_without_model_safetensors_reads_all_its_files(tmp_path):
    save_file({"b": torch.randn(2)}, tmp_path / "part-b.safetensors")
    save_file({"a": torch.randn(3)}, tmp_path / "part-a.safetensors")
    assert [n for n, _ in iter_checkpoint(tmp_path)] == ["a", "b"]


def test_several_sources_are_read_in_order_and_must_not_overlap(tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    save_file({"x": torch.randn(2)}, a, metadata={"format": "pt"})
    save_file({"y": torch.randn(2)}, b, metadata={"format": "pt", "note": "b"})
    save_file({"x": torch.randn(1)}, c, metadata={"format": "tf"})
    assert [n for n, _ in iter_checkpoint([b, a])] == ["y", "x"]
    assert checkpoint_metadata([a, b]) == {"format": "pt", "note": "b"}
    with pytest.raises(ValueError, match="a.safetensors: given twice"):
        checkpoint_files([a, tmp_path / "." / "a.safetensors"])
    with pytest.raises(ValueError, match=f"{c}: tensor 'x' is also in {a}"):
        checkpoint_files([a, c])
    with pytest.raises(ValueError, match=f"{c}: metadata 'format' is 'tf', {b} has 'pt'"):
        checkpoint_metadata([b, c])


# --- a model folder's small files ---------------------------------------------------------------------------------

def test_model_folder_files_round_trip_through_metadata_text(tmp_path, monkeypatch):
    source, target = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.model": bytes(range(256)),
             "merges.txt": "ä b\n".encode(), "chat_template.jinja": b"{{ x }}"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    (source / INDEX_FILE).write_text("{}")
    (source / "big.json").write_bytes(b" " * 301)
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "run.py").write_text("print()")
    (source / "sub.json").mkdir()
    monkeypatch.setattr(checkpoints, "MAX_MODEL_FILE_NBYTES", 300)
    assert model_folder_files(source) == files
    text = encode_model_files(files)
    assert json.loads(text)["config.json"] == '{"model_type": "llama"}'
    assert set(json.loads(text)["tokenizer.model"]) == {"base64"}
    assert decode_model_files(text) == files
    assert write_model_files(target, decode_model_files(text)) == [target / name for name in sorted(files)]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files


UNSAFE_NAMES = ["../config.json", "sub/config.json", "/tmp/config.json", "..", ".", "", "a\\b.json", "x\0.json",
                "run.py", INDEX_FILE, "model.safetensors"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_write_model_files_refuses_names_that_are_not_plain(tmp_path, name):
    with pytest.raises(ValueError, match="expected a plain file name"):
        write_model_files(tmp_path / "out", {"config.json": b"{}", name: b"x"})
    assert not (tmp_path / "out").exists() and not (tmp_path / "config.json").exists()
    with pytest.raises(ValueError, match=f"metadata '{MODEL_FILES_KEY}': file name"):
        decode_model_files(json.dumps({name: "x"}))


@pytest.mark.parametrize("text,match", [
    ("{", "Expecting"), ("[]", "expected a JSON object"), ('{"a.json": 3}', "expected its text"),
    ('{"a.json": {"base64": "@@"}}', "base64|Invalid|Non-base64"), ('{"a.json": {"hex": "00"}}', "expected its text"),
], ids=["not-json", "list", "number", "bad-base64", "other-encoding"])
def test_decode_model_files_rejects_malformed_metadata(text, match):
    with pytest.raises(ValueError, match=f"metadata '{MODEL_FILES_KEY}': .*({match})"):
        decode_model_files(text)


def test_written_files_get_the_mode_open_would_give(tmp_path):
    mask = os.umask(0o022)
    try:
        files = write_checkpoint([("w", (2,), torch.float32, lambda: torch.ones(2))], tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    assert [stat.S_IMODE(f.stat().st_mode) for f in files] == [0o644]

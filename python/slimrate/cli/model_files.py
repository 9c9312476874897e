"""`slimrate compress`, `inspect`, `decompress`: safetensors checkpoints (files, model folders, sharded folders) and
torch.distributed.checkpoint folders to .slim files, and .slim files back to safetensors, streamed one tensor at a
time."""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path

from slimrate.checkpoints import (
    DEFAULT_MAX_SHARD_SIZE,
    MODEL_FILES_KEY,
    SAFETENSORS_DTYPES,
    checkpoint_files,
    checkpoint_metadata,
    decode_model_files,
    encode_model_files,
    iter_checkpoint,
    model_folder_files,
    write_checkpoint,
    write_model_files,
)
from slimrate.checkpoints_dcp import is_dcp_checkpoint, iter_dcp_checkpoint
from slimrate.cli.arguments import MAX_BYTES_HELP, add_command, byte_limit, byte_size, positive_finite_float
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_input_file, check_output_file, check_output_folder, naming_file
from slimrate.train import list_checkpoints, verify_sharded_checkpoint
from slimrate.train.checkpoint import MANIFEST_FILE

SOURCE_KEY = "slimrate.source"  # the .slim metadata key that describes a DCP source
STORED_BITS = {str(dtype).removeprefix("torch."): 8 * dtype.itemsize for dtype in SAFETENSORS_DTYPES.values()}


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "compress", add_compress_arguments, check_compress, run_compress,
                help="entropy-code a safetensors checkpoint (file, model folder or sharded folder) or a "
                     "torch.distributed.checkpoint folder into a .slim file")
    add_command(commands, "inspect", add_inspect_arguments, check_inspect, run_inspect,
                help="per-tensor table of a .slim file: shape, bits/param, ratio against the stored dtype")
    add_command(commands, "decompress", add_decompress_arguments, check_decompress, run_decompress,
                help="decode a .slim file into a model folder (transformers' layout) or a .safetensors file")


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SRC",
                        help="a .safetensors file, a model folder (model.safetensors, or the shards named by "
                             "model.safetensors.index.json) or an index file; several are read in order. Or one "
                             "torch.distributed.checkpoint folder (.metadata and .distcp files: an FSDP training "
                             "checkpoint's step-N folder): its model's tensors, never the optimizer's")
    parser.add_argument("-o", "--output", required=True, help="the .slim file to write")
    step = parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--step", type=positive_finite_float, help="quantization step Δ for float tensors with ≥ 2 dims")
    step.add_argument("--max-error", type=positive_finite_float, help="largest |θ − θ̂| allowed (Δ = 2·max-error)")
    parser.add_argument("--coder", choices=["eg", "eg-signed", "rans"], default="eg",
                        help="eg: frequency-sorted table + EG0 of ranks (paper); eg-signed: signed EG0, no table; "
                             "rans: rANS (default %(default)s)")


def check_compress(args: argparse.Namespace) -> None:
    for source in map(Path, args.sources):
        steps = list_checkpoints(source) if not is_dcp_checkpoint(source) else []
        if steps and not any(source.glob("*.safetensors")):
            raise UsageError(f"{source}: a folder of training checkpoints, not one checkpoint; pass one of its step "
                             f"folders, e.g. the newest: {steps[-1][1]}")
    if not any(map(is_dcp_checkpoint, args.sources)):
        check_output_file("--output", args.output, inputs=checkpoint_files(args.sources))
        return
    if len(args.sources) > 1:
        raise UsageError(f"SRC: {next(filter(is_dcp_checkpoint, args.sources))} is a torch.distributed.checkpoint "
                         "folder; compress it on its own")
    folder = Path(args.sources[0])
    # a training checkpoint's folder: its manifest verified before .metadata is read
    args.manifest = verify_sharded_checkpoint(folder) if (folder / MANIFEST_FILE).is_file() else None
    check_output_file("--output", args.output, inputs=[p for p in folder.iterdir() if p.is_file()])


def dcp_source_metadata(folder: Path, manifest: dict | None) -> dict[str, str]:
    """The .slim metadata of a DCP source: its folder's name, and the step and world size its manifest gives."""
    source = {"format": "torch.distributed.checkpoint", "folder": folder.resolve().name}
    source.update({key: manifest[key] for key in ("step", "world_size") if manifest and key in manifest})
    return {SOURCE_KEY: json.dumps(source, sort_keys=True)}


def source_metadata(sources: list[str]) -> dict[str, str]:
    """The checkpoint's safetensors metadata, plus the small files (config, tokenizer) of the folders among
    ``sources`` under "slimrate.files", so that decompress gives back a folder from_pretrained loads."""
    metadata, files = checkpoint_metadata(sources), {}
    for folder in filter(Path.is_dir, map(Path, sources)):
        for name, data in model_folder_files(folder).items():
            if files.setdefault(name, data) != data:
                raise UsageError(f"{folder / name} differs from the {name} of an earlier folder; compress the "
                                 "folders one at a time")
    if files:
        metadata[MODEL_FILES_KEY] = encode_model_files(files)
    return metadata


def run_compress(args: argparse.Namespace) -> int:
    from slimrate.backslash import save_slim, slim_report

    with naming_file(", ".join(args.sources)):
        if is_dcp_checkpoint(args.sources[0]):
            tensors = iter_dcp_checkpoint(args.sources[0])
            metadata = dcp_source_metadata(Path(args.sources[0]), args.manifest)
        else:
            tensors, metadata = iter_checkpoint(args.sources), source_metadata(args.sources)
        save_slim(tensors, args.output, step=args.step, max_error=args.max_error, coder=args.coder,
                  metadata=metadata)
    total = sum(row["bytes"] for row in slim_report(args.output))
    print(f"wrote {args.output}: {Path(args.output).stat().st_size} bytes ({total} in tensor payloads)")
    return 0


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slim", help="a .slim file")


def check_inspect(args: argparse.Namespace) -> None:
    check_input_file(args.slim)


def format_slim_report(rows: list[dict], file_bytes: int) -> str:
    """One line per tensor: its payload's bits/param and the ratio of its stored dtype's bytes (bf16: 2 per
    param) to the payload's; then the totals, the ratio taken over the whole file."""
    lines = [f"{'name':<40} {'shape':<18} {'dtype':<9} {'coder':<9} {'step':>9} {'bytes':>10} {'bits/param':>10} "
             f"{'ratio':>7}"]
    for row in rows:
        step = "-" if row["step"] is None else f"{row['step']:.3g}"
        stored = math.prod(row["shape"]) * STORED_BITS[row["dtype"]] / 8
        ratio = stored / row["bytes"] if row["bytes"] else math.inf
        lines.append(f"{row['name']:<40} {str(list(row['shape'])):<18} {row['dtype']:<9} {row['coder']:<9} {step:>9} "
                     f"{row['bytes']:>10} {row['bits_per_param']:>10.3f} {ratio:>7.2f}")
    params = sum(math.prod(row["shape"]) for row in rows)
    stored = sum(math.prod(row["shape"]) * STORED_BITS[row["dtype"]] for row in rows) // 8
    lines.append(f"total: {len(rows)} tensors, {params} params, {file_bytes} bytes in the file "
                 f"({8 * file_bytes / max(params, 1):.3f} bits/param), {stored} bytes in the stored dtypes "
                 f"(ratio {stored / file_bytes:.2f})")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from slimrate.backslash import slim_report

    with naming_file(args.slim):
        rows = slim_report(args.slim)
    print(format_slim_report(rows, Path(args.slim).stat().st_size))
    return 0


def add_decompress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slim", help="a .slim file")
    parser.add_argument("-o", "--output", required=True,
                        help="a folder, written as transformers saves a model (model.safetensors, or shards and "
                             "model.safetensors.index.json; the config and tokenizer files compress stored), or a "
                             "file ending in .safetensors (tensors only)")
    parser.add_argument("--max-shard-size", type=byte_size,
                        help=f"largest shard of a folder output: bytes, or 500MB, 5GB, 2GiB (default "
                             f"{DEFAULT_MAX_SHARD_SIZE}, as transformers)")
    parser.add_argument("--max-bytes", type=byte_limit, help=MAX_BYTES_HELP)


def writes_one_file(args: argparse.Namespace) -> bool:
    return Path(args.output).suffix == ".safetensors"


def check_decompress(args: argparse.Namespace) -> None:
    check_input_file(args.slim)
    if not writes_one_file(args):
        check_output_folder("--output", args.output)
        return
    check_output_file("--output", args.output, inputs=(args.slim,))
    if args.max_shard_size is not None:
        raise UsageError(f"--max-shard-size: splits a folder output, and --output {args.output} is one .safetensors "
                         "file; pass a folder to --output, or leave --max-shard-size out")


def run_decompress(args: argparse.Namespace) -> int:
    from slimrate.backslash import SlimFile

    with naming_file(args.slim), SlimFile(args.slim, max_bytes=args.max_bytes) as slim:
        metadata = slim.metadata()
        files = decode_model_files(metadata.pop(MODEL_FILES_KEY, "{}"))
        items = []
        for name in slim.keys():
            info = slim.info(name)  # shape and dtype from the index: nothing is decoded before its bytes are written
            items.append((name, info["shape"], info["dtype"], partial(slim.get_tensor, name)))
        written = write_checkpoint(items, args.output, metadata=metadata,
                                   max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    if not writes_one_file(args):
        written += write_model_files(args.output, files)
    print("\n".join(f"wrote {path}" for path in written))
    return 0

"""`slimrate compress`, `inspect`, `decompress`: safetensors checkpoints to and from .slim files."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from slimrate.cli.arguments import add_command, positive_finite_float
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_input_file, check_output_file, naming_file
from slimrate.files import write_bytes_atomic

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}
# safetensors keeps the file's metadata under this key, so a tensor of that name makes a file it cannot read back
SAFETENSORS_RESERVED_NAMES = ("__metadata__",)


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "compress", add_compress_arguments, check_compress, run_compress,
                help="entropy-code a safetensors checkpoint into a .slim file")
    add_command(commands, "inspect", add_inspect_arguments, check_inspect, run_inspect,
                help="per-tensor table of a .slim file: shape, bits/param, ratio")
    add_command(commands, "decompress", add_decompress_arguments, check_decompress, run_decompress,
                help="decode a .slim file into a .safetensors file")


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .safetensors file, or a folder holding model.safetensors")
    parser.add_argument("-o", "--output", required=True, help="the .slim file to write")
    step = parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--step", type=positive_finite_float, help="quantization step Δ for float tensors with ≥ 2 dims")
    step.add_argument("--max-error", type=positive_finite_float, help="largest |θ − θ̂| allowed (Δ = 2·max-error)")
    parser.add_argument("--coder", choices=["eg", "eg-signed", "rans"], default="eg",
                        help="eg: frequency-sorted table + EG0 of ranks (paper); eg-signed: signed EG0, no table; "
                             "rans: rANS (default %(default)s)")


def checkpoint_file(path: str) -> Path:
    """The safetensors file of the CHECKPOINT argument; UsageError for a pickle file or a missing file."""
    file = Path(path)
    if file.is_dir():
        file = file / "model.safetensors"
    if file.suffix in PICKLE_SUFFIXES:
        raise UsageError(f"{path}: pickle checkpoints are not read (loading one can run arbitrary code); convert it "
                         "to safetensors first: safetensors.torch.save_file(torch.load(path, weights_only=True), "
                         "'model.safetensors')")
    if not file.is_file():
        raise UsageError(f"{file}: no such file (expected a .safetensors file or a folder holding model.safetensors)")
    return file


def check_compress(args: argparse.Namespace) -> None:
    check_output_file("--output", args.output, inputs=(checkpoint_file(args.checkpoint),))


def run_compress(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from slimrate.backslash import save_slim, slim_report

    checkpoint = checkpoint_file(args.checkpoint)
    with naming_file(checkpoint):
        state = load_file(checkpoint)
        if not state:
            raise UsageError(f"{checkpoint}: no tensors in the file, nothing to compress")
        save_slim(state, args.output, step=args.step, max_error=args.max_error, coder=args.coder)
    total = sum(row["bytes"] for row in slim_report(args.output))
    print(f"wrote {args.output}: {Path(args.output).stat().st_size} bytes ({total} in tensor payloads)")
    return 0


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slim", help="a .slim file")


def check_inspect(args: argparse.Namespace) -> None:
    check_input_file(args.slim)


def format_slim_report(rows: list[dict], file_bytes: int) -> str:
    lines = [f"{'name':<40} {'shape':<18} {'dtype':<9} {'coder':<9} {'step':>9} {'bytes':>10} {'bits/param':>10} "
             f"{'ratio':>7}"]
    for row in rows:
        step = "-" if row["step"] is None else f"{row['step']:.3g}"
        lines.append(f"{row['name']:<40} {str(list(row['shape'])):<18} {row['dtype']:<9} {row['coder']:<9} {step:>9} "
                     f"{row['bytes']:>10} {row['bits_per_param']:>10.3f} {row['ratio']:>7.2f}")
    params = sum(math.prod(row["shape"]) for row in rows)
    lines.append(f"total: {len(rows)} tensors, {params} params, {file_bytes} bytes in the file "
                 f"({8 * file_bytes / max(params, 1):.3f} bits/param, ratio vs fp32 {4 * params / file_bytes:.2f})")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from slimrate.backslash import slim_report

    with naming_file(args.slim):
        rows = slim_report(args.slim)
    print(format_slim_report(rows, Path(args.slim).stat().st_size))
    return 0


def add_decompress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slim", help="a .slim file")
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file to write")


def check_decompress(args: argparse.Namespace) -> None:
    check_input_file(args.slim)
    check_output_file("--output", args.output, inputs=(args.slim,))


def run_decompress(args: argparse.Namespace) -> int:
    from safetensors.torch import save

    from slimrate.backslash import load_slim

    with naming_file(args.slim):
        state = load_slim(args.slim)
        reserved = [name for name in SAFETENSORS_RESERVED_NAMES if name in state]
        if reserved:
            raise UsageError(f"{args.slim}: tensor name {reserved[0]!r} is reserved by safetensors (it holds the "
                             "file's metadata); rename the tensor: load_slim, rename the key, save_slim")
    print(f"wrote {write_bytes_atomic(args.output, save(state))}")
    return 0

"""`slimrate export`: a model file to an ExecuTorch program (.pte), its sparse layers as slimrate's custom ops."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimrate.cli.arguments import MAX_BYTES_HELP, add_command, byte_limit, nonnegative_float, positive_int
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_input_file, check_output_file, naming_file

SPARSE_FORMATS = ("csr", "bsr")  # slimrate.sparse.linear.FORMATS, spelled out so --help needs no torch import
EDGE_BACKENDS = ("xnnpack", "portable")  # slimrate.edge.BACKENDS, likewise


def built_in_architecture(text: str) -> str:
    """--arch: a name in runtime.MODELS (export needs a fixed example input, which the built-ins define)."""
    from slimrate import runtime

    if text in runtime.MODELS:
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(runtime.MODELS)})")


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "export", add_arguments, check, run,
                help="write a model as an ExecuTorch program (.pte) with slimrate's sparse kernels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a .slim or .safetensors file, or a model folder of safetensors shards")
    parser.add_argument("--arch", required=True, type=built_in_architecture, metavar="{digits,charlm}",
                        help="the built-in architecture the weights belong to (sized from the weights)")
    parser.add_argument("-o", "--output", required=True, help="the .pte file to write")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="batch size the program takes: its input shape is fixed at export (default 1)")
    parser.add_argument("--min-sparsity", type=nonnegative_float, default=0.5,
                        help="layers with at least this share of zeros become sparse layers (default 0.5)")
    parser.add_argument("--format", choices=SPARSE_FORMATS, default="csr",
                        help="sparse storage: csr (1×1 blocks) or bsr (--block, default 4 4) (default csr)")
    parser.add_argument("--block", type=positive_int, nargs=2, metavar=("R", "C"),
                        help="block rows and columns of --format bsr, e.g. 8 1")
    parser.add_argument("--dense", action="store_true",
                        help="keep every layer dense (the baseline a sparse export is compared with)")
    parser.add_argument("--backend", choices=EDGE_BACKENDS, default="xnnpack",
                        help="where the dense ops run: xnnpack (its delegate) or portable (ExecuTorch's kernels) "
                             "(default xnnpack)")
    parser.add_argument("--max-bytes", type=byte_limit, help=MAX_BYTES_HELP)


def check(args: argparse.Namespace) -> None:
    if not Path(args.model).is_dir():
        check_input_file(args.model)
    check_output_file("--output", args.output, inputs=(args.model,))
    if args.block is not None and args.format != "bsr":
        raise UsageError(f"--block: {args.format} stores 1×1 blocks; pass --format bsr with --block")
    if args.dense and (args.block is not None or args.format != "csr"):
        raise UsageError("--dense: keeps every layer dense, so --format and --block do not apply; leave them out")


def run(args: argparse.Namespace) -> int:
    from slimrate import edge, runtime
    from slimrate.sparse import format_decisions, sparsify

    with naming_file(args.model):  # a corrupt file, or weights that do not fit --arch
        model = runtime.load(args.model, model_factory=args.arch, sparse=False, max_bytes=args.max_bytes)
    if not args.dense:
        block = tuple(args.block) if args.block is not None else None
        print(format_decisions(sparsify(model, args.min_sparsity, format=args.format, block=block, measure=False)))
    x = runtime.example_input(args.arch, model, args.batch)
    path = edge.export(model, (x,), args.output, backend=args.backend)
    print(f"wrote {path}: {path.stat().st_size} bytes; input {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}")
    return 0

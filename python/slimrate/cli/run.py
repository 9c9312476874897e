"""`slimrate run`: load a model with the runtime, dense vs sparse layers; --bench times both."""

from __future__ import annotations

import argparse

from slimrate.cli.arguments import add_command, nonnegative_float, positive_int
from slimrate.cli.paths import check_input_file, naming_file


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "run", add_arguments, check, run,
                help="load a model with the runtime (dense vs sparse layers); --bench times it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a .slim or .safetensors file")
    parser.add_argument("--arch", required=True, choices=["digits", "charlm"],
                        help="the built-in architecture the weights belong to (sized from the weights)")
    parser.add_argument("--bench", action="store_true", help="measure latency and weight memory, dense vs sparse")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size of the random inputs (default 1)")
    parser.add_argument("--min-sparsity", type=nonnegative_float, default=0.5,
                        help="layers with at least this share of zeros are candidates for sparse kernels "
                             "(default 0.5)")
    parser.add_argument("--repeats", type=positive_int, default=50, help="timed calls per measurement (default 50)")


def check(args: argparse.Namespace) -> None:
    check_input_file(args.model)


def run(args: argparse.Namespace) -> int:
    import torch

    from slimrate import runtime
    from slimrate.sparse.linear import format_decisions

    with naming_file(args.model):  # a corrupt file, or weights that do not fit --arch
        state = runtime.read_state_dict(args.model)
        dense = runtime.load(state, model_factory=args.arch, sparse=False)
    sparse = runtime.load(state, model_factory=args.arch, sparse=True, min_sparsity=args.min_sparsity,
                          batch_size=args.batch)
    print(format_decisions(sparse.sparsify_decisions))
    if args.bench:
        x = runtime.MODELS[args.arch].example(dense, args.batch)
        with torch.no_grad():
            err = (sparse(x) - dense(x)).abs().max().item()
        dense_us = runtime.latency_us(dense, x, args.repeats)
        sparse_us = runtime.latency_us(sparse, x, args.repeats)
        dense_bytes, sparse_bytes = runtime.weight_bytes(dense), runtime.weight_bytes(sparse)
        print(f"input {tuple(x.shape)} {x.dtype}; max |sparse − dense| = {err:.3g}")
        print(f"latency (median of {args.repeats}): dense {dense_us:.1f} µs, sparse {sparse_us:.1f} µs "
              f"({dense_us / sparse_us:.2f}× speed-up)")
        print(f"weight memory: dense {dense_bytes} bytes, sparse {sparse_bytes} bytes "
              f"({sparse_bytes / dense_bytes:.1%} of dense)")
    return 0

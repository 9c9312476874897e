"""`slimrate run`: load a model with the runtime, dense vs sparse layers; --bench times both."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimrate.cli.arguments import MAX_BYTES_HELP, add_command, byte_limit, nonnegative_float, positive_int
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_input_file, naming_file


def architecture(text: str) -> str:
    """--arch: a name in runtime.MODELS, or hf:CONFIG_DIR (the folder is checked by ``check``)."""
    from slimrate import runtime
    from slimrate.runtime.hf import HF_PREFIX

    if text in runtime.MODELS or (text.startswith(HF_PREFIX) and len(text) > len(HF_PREFIX)):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(runtime.MODELS)}, "
                                     f"{HF_PREFIX}CONFIG_DIR)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "run", add_arguments, check, run,
                help="load a model with the runtime (dense vs sparse layers); --bench times it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a .slim or .safetensors file, or a model folder of safetensors shards")
    parser.add_argument("--arch", required=True, type=architecture, metavar="{digits,charlm,hf:CONFIG_DIR}",
                        help="the architecture the weights belong to: a built-in one (sized from the weights), or "
                             "hf:CONFIG_DIR, the transformers causal LM of the config.json in the folder CONFIG_DIR")
    parser.add_argument("--bench", action="store_true", help="measure latency and weight memory, dense vs sparse")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size of the random inputs (default 1)")
    parser.add_argument("--min-sparsity", type=nonnegative_float, default=0.5,
                        help="layers with at least this share of zeros are candidates for sparse kernels "
                             "(default 0.5)")
    parser.add_argument("--repeats", type=positive_int, default=50, help="timed calls per measurement (default 50)")
    parser.add_argument("--max-bytes", type=byte_limit, help=MAX_BYTES_HELP)


def check(args: argparse.Namespace) -> None:
    if not Path(args.model).is_dir():
        check_input_file(args.model)
    from slimrate.runtime.hf import hf_config_dir, is_hf_factory

    if is_hf_factory(args.arch):
        try:
            hf_config_dir(args.arch, "--arch")
        except ValueError as e:
            raise UsageError(str(e)) from e


def run(args: argparse.Namespace) -> int:
    import torch

    from slimrate import runtime
    from slimrate.sparse.linear import format_decisions

    with naming_file(args.model):  # a corrupt file, or weights that do not fit --arch
        dense = runtime.load(args.model, model_factory=args.arch, sparse=False, max_bytes=args.max_bytes)
    sparse = runtime.load(args.model, model_factory=args.arch, sparse=True, min_sparsity=args.min_sparsity,
                          batch_size=args.batch, max_bytes=args.max_bytes)
    print(format_decisions(sparse.sparsify_decisions))
    if args.bench:
        x = runtime.example_input(args.arch, dense, args.batch)
        with torch.no_grad():
            err = (runtime.output_tensor(sparse(x)) - runtime.output_tensor(dense(x))).abs().max().item()
        dense_us = runtime.latency_us(dense, x, args.repeats)
        sparse_us = runtime.latency_us(sparse, x, args.repeats)
        dense_bytes, sparse_bytes = runtime.weight_bytes(dense), runtime.weight_bytes(sparse)
        print(f"input {tuple(x.shape)} {x.dtype}; max |sparse − dense| = {err:.3g}")
        print(f"latency (median of {args.repeats}): dense {dense_us:.1f} µs, sparse {sparse_us:.1f} µs "
              f"({dense_us / sparse_us:.2f}× speed-up)")
        print(f"weight memory: dense {dense_bytes} bytes, sparse {sparse_bytes} bytes "
              f"({sparse_bytes / dense_bytes:.1%} of dense)")
    return 0

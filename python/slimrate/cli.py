"""The `slimrate` command line; the only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from slimrate.files import write_bytes_atomic, write_text_atomic


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_finite_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from slimrate.demo import DemoConfig

    parser = argparse.ArgumentParser(prog="slimrate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="BackSlash vs plain training of a digits classifier")
    defaults = DemoConfig()
    demo.add_argument("--lam", type=nonnegative_float, default=defaults.lam, help="rate weight λ (default %(default)s)")
    demo.add_argument("--steps", type=positive_int, default=defaults.steps, help="training steps per run")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--mode", choices=["decoupled", "grad"], default=defaults.mode,
                      help="decoupled: θ ← θ − λ∂R/∂θ after each optimizer step; grad: λ∂R/∂θ added to the gradient")
    demo.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    demo.add_argument("--out", metavar="DIR", help="write each run's metrics (JSONL, TensorBoard) under DIR")
    demo.add_argument("--wandb", action="store_true", help="also log to wandb, offline (needs --out and wandb)")
    schedules = commands.add_parser("schedules", help="learning-rate schedules: UBA and its baselines")
    schedule_commands = schedules.add_subparsers(dest="schedules_command", required=True)
    plot = schedule_commands.add_parser("plot", help="plot UBA for several φ beside the baselines to a PNG")
    plot.add_argument("--total", type=positive_int, default=1000, help="step budget (default %(default)s)")
    plot.add_argument("--phi", type=positive_finite_float, nargs="+", default=[0.5, 1.0, 2.0, 5.0],
                      help="UBA φ values, 2 = cosine (default %(default)s)")
    plot.add_argument("--warmup", type=nonnegative_int, default=0, help="warm-up steps, < --total (default 0)")
    plot.add_argument("-o", "--output", default="schedules.png", help="PNG path (default %(default)s)")
    study = commands.add_parser("study", help="studies that write tables and plots")
    study_commands = study.add_subparsers(dest="study_command", required=True)
    schedule_study = study_commands.add_parser("schedules", help="UBA vs baseline schedules at several budgets")
    schedule_study.add_argument("--quick", action="store_true", help="a seconds-long version (tiny budgets, one seed)")
    schedule_study.add_argument("-o", "--out", default="bench/results",
                                help="folder for schedules_study.{md,png,json} (default %(default)s)")
    backslash_study = study_commands.add_parser("backslash", help="λ sweep: .slim sizes vs other coders, pruning")
    backslash_study.add_argument("--quick", action="store_true", help="a seconds-long version (two λ, tiny budgets)")
    backslash_study.add_argument("-o", "--out", default="bench/results",
                                 help="folder for backslash.{md,png,json} (default %(default)s)")
    compress = commands.add_parser("compress", help="entropy-code a safetensors checkpoint into a .slim file")
    compress.add_argument("checkpoint", help="a .safetensors file, or a folder holding model.safetensors")
    compress.add_argument("-o", "--output", required=True, help="the .slim file to write")
    step = compress.add_mutually_exclusive_group(required=True)
    step.add_argument("--step", type=positive_finite_float, help="quantization step Δ for float tensors with ≥ 2 dims")
    step.add_argument("--max-error", type=positive_finite_float, help="largest |θ − θ̂| allowed (Δ = 2·max-error)")
    compress.add_argument("--coder", choices=["eg", "eg-signed", "rans"], default="eg",
                          help="eg: frequency-sorted table + EG0 of ranks (paper); eg-signed: signed EG0, no table; "
                               "rans: rANS (default %(default)s)")
    inspect = commands.add_parser("inspect", help="per-tensor table of a .slim file: shape, bits/param, ratio")
    inspect.add_argument("slim", help="a .slim file")
    decompress = commands.add_parser("decompress", help="decode a .slim file into a .safetensors file")
    decompress.add_argument("slim", help="a .slim file")
    decompress.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    run = commands.add_parser("run", help="load a model with the runtime (dense vs sparse layers); --bench times it")
    run.add_argument("model", help="a .slim or .safetensors file")
    run.add_argument("--arch", required=True, choices=["digits", "charlm"],
                     help="the built-in architecture the weights belong to (sized from the weights)")
    run.add_argument("--bench", action="store_true", help="measure latency and weight memory, dense vs sparse")
    run.add_argument("--batch", type=positive_int, default=1, help="batch size of the random inputs (default 1)")
    run.add_argument("--min-sparsity", type=nonnegative_float, default=0.5,
                     help="layers with at least this share of zeros are candidates for sparse kernels (default 0.5)")
    run.add_argument("--repeats", type=positive_int, default=50, help="timed calls per measurement (default 50)")
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    from slimrate.demo import DemoConfig, format_table, run_demo

    result = run_demo(DemoConfig(steps=args.steps, lam=args.lam, seed=args.seed, mode=args.mode, out_dir=args.out,
                                 wandb=args.wandb))
    print(format_table(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_schedules_plot_command(args: argparse.Namespace) -> int:
    from slimrate.schedules import plot_schedules

    png = plot_schedules(args.total, args.phi, warmup_steps=args.warmup)
    print(write_bytes_atomic(args.output, png))
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    if args.study_command == "schedules":
        from slimrate.studies.schedules import StudyConfig, quick_config, write_study

        paths = write_study(quick_config() if args.quick else StudyConfig(), args.out)
    else:
        from slimrate.studies.backslash import BackslashStudyConfig, quick_backslash_config, write_backslash_study

        paths = write_backslash_study(quick_backslash_config() if args.quick else BackslashStudyConfig(), args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0


def checkpoint_file(path: str) -> Path | str:
    """The safetensors file of CHECKPOINT, or a message saying what is wrong with it."""
    file = Path(path)
    if file.is_dir():
        file = file / "model.safetensors"
    if file.suffix in {".pt", ".pth", ".bin", ".ckpt", ".pkl"}:
        return (f"{path}: pickle checkpoints are not read (loading one can run arbitrary code); convert it to "
                "safetensors first: safetensors.torch.save_file(torch.load(path, weights_only=True), "
                "'model.safetensors')")
    if not file.is_file():
        return f"{file}: no such file (expected a .safetensors file or a folder holding model.safetensors)"
    return file


def run_compress_command(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from slimrate.backslash import save_slim, slim_report

    save_slim(load_file(args.checkpoint), args.output, step=args.step, max_error=args.max_error, coder=args.coder)
    total = sum(row["bytes"] for row in slim_report(args.output))
    print(f"wrote {args.output}: {Path(args.output).stat().st_size} bytes ({total} in tensor payloads)")
    return 0


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


def run_inspect_command(args: argparse.Namespace) -> int:
    from slimrate.backslash import slim_report

    print(format_slim_report(slim_report(args.slim), Path(args.slim).stat().st_size))
    return 0


def run_decompress_command(args: argparse.Namespace) -> int:
    from safetensors.torch import save

    from slimrate.backslash import load_slim

    print(f"wrote {write_bytes_atomic(args.output, save(load_slim(args.slim)))}")
    return 0


def run_model_command(args: argparse.Namespace) -> int:
    import torch

    from slimrate import runtime
    from slimrate.sparse.linear import format_decisions

    dense = runtime.load(args.model, model_factory=args.arch, sparse=False)
    sparse = runtime.load(args.model, model_factory=args.arch, sparse=True, min_sparsity=args.min_sparsity,
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.wandb and not args.out:
        parser.error("--wandb: needs --out DIR for wandb's offline files")
    if args.command == "schedules" and args.total < 2:
        parser.error(f"--total: expected an integer >= 2 (OneCycle needs a ramp and a decay), got {args.total}")
    if args.command == "schedules" and args.warmup >= args.total:
        parser.error(f"--warmup: expected an integer < --total ({args.total}), got {args.warmup}")
    if args.command == "compress":
        checkpoint = checkpoint_file(args.checkpoint)
        if isinstance(checkpoint, str):
            parser.error(checkpoint)
        args.checkpoint = str(checkpoint)
    if args.command in ("inspect", "decompress") and not Path(args.slim).is_file():
        parser.error(f"{args.slim}: no such file")
    if args.command == "run" and not Path(args.model).is_file():
        parser.error(f"{args.model}: no such file")
    commands = {"demo": run_demo_command, "schedules": run_schedules_plot_command, "study": run_study_command,
                "compress": run_compress_command, "inspect": run_inspect_command,
                "decompress": run_decompress_command, "run": run_model_command}
    try:
        return commands[args.command](args)
    except ValueError as e:  # SlimFormatError (a corrupt file) or save_slim's refusals (NaN, int32 overflow)
        print(f"slimrate {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

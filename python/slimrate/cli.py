"""The `slimrate` command line; the only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import math
import sys

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
    from slimrate.studies.schedules import StudyConfig, quick_config, write_study

    for path in write_study(quick_config() if args.quick else StudyConfig(), args.out):
        print(f"wrote {path}")
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
    commands = {"demo": run_demo_command, "schedules": run_schedules_plot_command, "study": run_study_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

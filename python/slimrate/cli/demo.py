"""`slimrate demo`: BackSlash vs plain training of a digits classifier."""

from __future__ import annotations

import argparse
import json

from slimrate.cli.arguments import add_command, add_parallel_argument, nonnegative_float, positive_int
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_output_file, check_output_folder
from slimrate.files import write_text_atomic


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_command(commands, "demo", add_arguments, check, run,
                help="BackSlash vs plain training of a digits classifier")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimrate.demo import DemoConfig

    defaults = DemoConfig()
    parser.add_argument("--lam", type=nonnegative_float, default=defaults.lam,
                        help="rate weight λ (default %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="training steps per run")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--mode", choices=["decoupled", "loss", "grad"], default=defaults.mode,
                        help="decoupled: θ ← θ − λ∂R/∂θ after each optimizer step; loss: λR in the loss, so "
                        "λ∂R/∂θ is added to the gradient (grad: an older name for loss)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--out", metavar="DIR", help="write each run's metrics (JSONL, TensorBoard) under DIR")
    parser.add_argument("--wandb", action="store_true", help="also log to wandb, offline (needs --out and wandb)")
    add_parallel_argument(parser)


def check(args: argparse.Namespace) -> None:
    if args.wandb and not args.out:
        raise UsageError("--wandb: needs --out DIR for wandb's offline files")
    if args.json:
        check_output_file("--json", args.json)
    if args.out:
        check_output_folder("--out", args.out)


def run(args: argparse.Namespace) -> int:
    from slimrate.demo import DemoConfig, format_table, run_demo

    result = run_demo(DemoConfig(steps=args.steps, lam=args.lam, seed=args.seed, mode=args.mode, out_dir=args.out,
                                 wandb=args.wandb, parallel=args.parallel))
    print(format_table(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

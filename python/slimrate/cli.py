"""The `slimrate` command line; the only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import sys

from slimrate.files import write_text_atomic


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
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    from slimrate.demo import DemoConfig, format_table, run_demo

    result = run_demo(DemoConfig(steps=args.steps, lam=args.lam, seed=args.seed, mode=args.mode))
    print(format_table(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"demo": run_demo_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

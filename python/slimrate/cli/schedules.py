"""`slimrate schedules plot`: UBA for several φ beside the baseline learning-rate schedules."""

from __future__ import annotations

import argparse

from slimrate.cli.arguments import add_command, nonnegative_int, positive_finite_float, positive_int
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_output_file
from slimrate.files import write_bytes_atomic


def add_commands(commands: argparse._SubParsersAction) -> None:
    schedules = commands.add_parser("schedules", help="learning-rate schedules: UBA and its baselines")
    add_command(schedules.add_subparsers(dest="schedules_command", required=True), "plot", add_arguments, check, run,
                help="plot UBA for several φ beside the baselines to a PNG")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--total", type=positive_int, default=1000, help="step budget (default %(default)s)")
    parser.add_argument("--phi", type=positive_finite_float, nargs="+", default=[0.5, 1.0, 2.0, 5.0],
                        help="UBA φ values, 2 = cosine (default %(default)s)")
    parser.add_argument("--warmup", type=nonnegative_int, default=0, help="warm-up steps, < --total (default 0)")
    parser.add_argument("-o", "--output", default="schedules.png", help="PNG path (default %(default)s)")


def check(args: argparse.Namespace) -> None:
    if args.total < 2:
        raise UsageError(f"--total: expected an integer >= 2 (OneCycle needs a ramp and a decay), got {args.total}")
    if args.warmup >= args.total:
        raise UsageError(f"--warmup: expected an integer < --total ({args.total}), got {args.warmup}")
    check_output_file("--output", args.output)


def run(args: argparse.Namespace) -> int:
    from slimrate.schedules import plot_schedules

    png = plot_schedules(args.total, args.phi, warmup_steps=args.warmup)
    print(write_bytes_atomic(args.output, png))
    return 0

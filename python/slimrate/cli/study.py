"""`slimrate study schedules|backslash|dmb`: studies that write a table, a plot and every run as JSON."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from slimrate.cli.arguments import add_command
from slimrate.cli.paths import check_output_folder


def add_commands(commands: argparse._SubParsersAction) -> None:
    study = commands.add_parser("study", help="studies that write tables and plots")
    studies = study.add_subparsers(dest="study_command", required=True)
    add_command(studies, "schedules", partial(add_arguments, quick="a seconds-long version (tiny budgets, one seed)",
                                              files="schedules_study.{md,png,json}"),
                check, run_schedules, help="UBA vs baseline schedules at several budgets")
    add_command(studies, "backslash", partial(add_arguments, quick="a seconds-long version (two λ, tiny budgets)",
                                              files="backslash.{md,png,json}"),
                check, run_backslash, help="λ sweep: .slim sizes vs other coders, pruning")
    add_command(studies, "dmb", add_dmb_arguments, check, run_dmb,
                help="DMB vs SEDD-absorb vs SEDD-uniform: bound in bits/char")


def add_arguments(parser: argparse.ArgumentParser, quick: str, files: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("-o", "--out", default="bench/results", help=f"folder for {files} (default %(default)s)")


def add_dmb_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, quick="a seconds-long version (tiny net, a few steps)", files="dmb.{md,png,json}")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run: weights, batches, times "
                        "(default %(default)s)")


def check(args: argparse.Namespace) -> None:
    check_output_folder("--out", args.out)


def run_schedules(args: argparse.Namespace) -> int:
    from slimrate.studies.schedules import StudyConfig, quick_config, write_study

    return print_written(write_study(quick_config() if args.quick else StudyConfig(), args.out))


def run_backslash(args: argparse.Namespace) -> int:
    from slimrate.studies.backslash import BackslashStudyConfig, quick_backslash_config, write_backslash_study

    return print_written(write_backslash_study(quick_backslash_config() if args.quick else BackslashStudyConfig(),
                                               args.out))


def run_dmb(args: argparse.Namespace) -> int:
    from slimrate.studies.dmb import DMBStudyConfig, quick_dmb_config, write_dmb_study

    config = quick_dmb_config() if args.quick else DMBStudyConfig()
    return print_written(write_dmb_study(dataclasses.replace(config, seed=args.seed), args.out))


def print_written(paths: Iterable[Path]) -> int:
    for path in paths:
        print(f"wrote {path}")
    return 0

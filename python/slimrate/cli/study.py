"""`slimrate study NAME`: one sub-command per entry of slimrate.studies.STUDIES; each writes a table, a plot
and every run as JSON."""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

from slimrate.cli.arguments import add_command
from slimrate.cli.paths import check_output_folder


def add_commands(commands: argparse._SubParsersAction) -> None:
    from slimrate.studies import STUDIES

    study = commands.add_parser("study", help="studies that write tables and plots")
    studies = study.add_subparsers(dest="study_command", required=True)
    for name, spec in STUDIES.items():
        add_command(studies, name, partial(add_arguments, stem=spec.stem), check, run, help=spec.help)


def add_arguments(parser: argparse.ArgumentParser, stem: str) -> None:
    parser.add_argument("--quick", action="store_true", help="a seconds-long version (tiny budgets, for tests)")
    parser.add_argument("-o", "--out", default="bench/results",
                        help=f"folder for {stem}.{{md,png,json}} (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: every run's weights, data and times derive "
                        "from it (default %(default)s)")


def check(args: argparse.Namespace) -> None:
    check_output_folder("--out", args.out)


def run(args: argparse.Namespace) -> int:
    from slimrate.studies import STUDIES, run_study

    study = STUDIES[args.study_command]
    config = dataclasses.replace(study.quick() if args.quick else study.config(), seed=args.seed)
    for path in run_study(args.study_command, config, args.out):
        print(f"wrote {path}")
    return 0

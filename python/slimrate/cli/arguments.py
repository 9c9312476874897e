"""argparse plumbing shared by the commands: the parser class, sub-command wiring and the value types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from slimrate.cli.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse that raises its errors as UsageError, so main prints them as one line and exits 2 like every other
    expected failure (plain argparse prints its usage text and raises SystemExit)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


def add_command(commands: argparse._SubParsersAction, name: str,
                add_arguments: Callable[[argparse.ArgumentParser], None], check: Callable[[argparse.Namespace], None],
                run: Callable[[argparse.Namespace], int], **parser_options) -> argparse.ArgumentParser:
    """Sub-command ``name``: add_arguments(parser) declares its arguments, check(args) refuses bad values with a
    UsageError before any work, run(args) does the work and returns the exit status."""
    parser = commands.add_parser(name, **parser_options)
    add_arguments(parser)
    parser.set_defaults(check=check, run=run, prog=parser.prog)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_finite_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value

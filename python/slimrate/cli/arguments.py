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


def add_parallel_argument(parser: argparse.ArgumentParser) -> None:
    """``--parallel ddp|fsdp``: how a training command runs under torchrun (docs/training.md §6)."""
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                        help="under torchrun: ddp replicates the model on each process, fsdp shards it with FSDP2 "
                             "(default %(default)s; one process runs it whole either way)")


def add_device_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--device cpu|cuda|cuda:N``: where the command ``what`` runs (default cpu), checked while parsing."""
    parser.add_argument("--device", type=device_name, default="cpu",
                        help=f"where to {what}: cpu, cuda or cuda:N (default %(default)s)")


def device_name(text: str) -> str:
    """A device slimrate.train.check_device accepts here ('cuda' only where this process sees a GPU)."""
    from slimrate.train import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device: ")) from None
    return text


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


def byte_size(text: str) -> int:
    """A size in bytes, read as slimrate.checkpoints.parse_size reads it: plain digits, or 500MB, 5GB, 2GiB; > 0."""
    from slimrate.checkpoints import parse_size

    try:
        return parse_size(text, "size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def byte_limit(text: str) -> float:
    """A byte_size, or "inf" for no limit."""
    return math.inf if text.strip().lower() == "inf" else byte_size(text)


MAX_BYTES_HELP = ("refuse a .slim file whose tensors decode to more bytes than this: bytes, or 8GiB, 500MB, or inf "
                  "(default: max(1 GiB, 256 × the file's size); raise it for a file you trust)")

"""The `slimrate` command line; the only package that parses arguments.

Each module adds one command group: per sub-command, its arguments, a check of their values and paths that runs
before any work, and the run. main is the one place where expected failures (errors.EXPECTED_ERRORS) become one
line on stderr and exit status 2, and where warnings (e.g. a damaged checkpoint skipped on resume) become one line
too.
"""

from __future__ import annotations

import sys
import warnings

from slimrate.cli import demo, dmb, export, model_files, qlora, run, schedules, study
from slimrate.cli.arguments import Parser
from slimrate.cli.errors import EXPECTED_ERRORS, UsageError, one_line

COMMAND_GROUPS = (demo, schedules, study, model_files, run, export, qlora, dmb)


def build_parser() -> Parser:
    parser = Parser(prog="slimrate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in argv (default sys.argv[1:]); returns the exit status: 0, or 2 for a bad command line,
    input file or output path, reported as one line `slimrate <command>: <message>` on stderr. Warnings are one
    line `slimrate <command>: warning: <message>` each. --help prints the help and raises argparse's
    SystemExit(0)."""
    parser = build_parser()
    prog = parser.prog

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            args = parser.parse_args(argv)
            prog = args.prog
            args.check(args)
            return args.run(args)
        except EXPECTED_ERRORS as e:
            print(f"{e.prog if isinstance(e, UsageError) and e.prog else prog}: {one_line(e)}", file=sys.stderr)
            return 2


__all__ = ["build_parser", "main"]

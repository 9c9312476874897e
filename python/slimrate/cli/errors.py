"""The failures the CLI reports as one line and exit status 2 instead of a traceback."""

from __future__ import annotations

from safetensors import SafetensorError


class UsageError(Exception):
    """A bad flag value, input file or output path, found by argparse, a command's check or its run.

    prog: the sub-command that argparse was parsing (e.g. "slimrate compress"); None after parsing, when main
    knows it."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


# Failures of the user's input, not of slimrate; each message names the file, tensor or flag at fault:
# - UsageError: argparse's errors and the commands' own checks;
# - ValueError: slimrate's checks of arguments and file contents (SlimFormatError, CheckpointError, a state dict
#   that does not fit the architecture, malformed JSONL, a NaN weight for compress, ...);
# - OSError: a file that cannot be read or written (missing, a folder, no permission, disk full);
# - SafetensorError: a file that safetensors cannot parse.
# Everything else keeps its traceback: it is a bug in slimrate. That includes TypeError: argparse gives every value
# its type, so slimrate's TypeErrors (a wrong argument type) cannot come from the command line.
EXPECTED_ERRORS = (UsageError, ValueError, OSError, SafetensorError)


def one_line(error: BaseException) -> str:
    """The message of an expected error, on one line."""
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    elif isinstance(error, SafetensorError):
        message = f"not a valid safetensors file ({error})"
    else:
        message = str(error)
    return " ".join(line.strip() for line in message.splitlines() if line.strip())

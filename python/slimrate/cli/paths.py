"""The CLI's input and output paths: checked before any work starts, so a long run never ends in a failed write;
errors about an input's content name the file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from slimrate.cli.errors import UsageError, one_line


def check_input_file(path: str, flag: str | None = None) -> None:
    """UsageError unless ``path`` (the value of ``flag``, or a positional argument) is an existing file."""
    if not Path(path).is_file():
        raise UsageError(f"{f'{flag}: ' if flag else ''}{path}: no such file")


def check_output_file(flag: str, output: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """UsageError unless the file ``output`` (the value of ``flag``) can be written: not a folder, in an existing
    writable folder, and none of ``inputs`` (same path, or the same file through a link)."""
    path = Path(output)
    if path.is_dir():
        raise UsageError(f"{flag}: {output} is a folder; pass a file path")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{flag}: {output}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {output}: folder {folder} is not writable")
    for source in inputs:
        if path.resolve() == Path(source).resolve() or (path.exists() and os.path.samefile(path, source)):
            raise UsageError(f"{flag}: {output} is the input file {source}; write to another path")


def check_output_folder(flag: str, output: str | os.PathLike) -> None:
    """UsageError unless the folder ``output`` (the value of ``flag``) exists or can be created, and is writable."""
    path = Path(output)
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise UsageError(f"{flag}: {output}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {output}: folder {existing} is not writable")


@contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Report a bad content of the input file or folder ``path`` (ValueError, SafetensorError) as ``path: reason``;
    a reason that starts with the path already (SlimFormatError's do), or with a file inside the folder, is not
    prefixed again."""
    try:
        yield
    except (ValueError, SafetensorError) as e:
        message = one_line(e)
        if not message.startswith((f"{path}: ", f"{Path(path)}: ", f"{Path(path)}{os.sep}")):
            message = f"{path}: {message}"
        raise UsageError(message) from e

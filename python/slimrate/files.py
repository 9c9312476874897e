"""Atomic file writes: temporary files in the targets' folders, fsync, then renames over the targets, so a reader
never sees a half-written file and an interruption leaves the old files intact; and the PNG bytes of a matplotlib
figure, for such writes."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class StagedWrites:
    """Files written under temporary names beside their targets, renamed over them together when the ``with``
    block ends cleanly; an exception removes every temporary file and leaves the targets as they were.

        with StagedWrites() as staged:
            with staged.open("a.bin") as f:     # a file object; streamed writes are fine
                f.write(...)
            with staged.open("b.bin") as f:     # "a.bin" is not replaced yet
                ...
                                                # both renamed here
    """

    def __init__(self):
        self._pending: list[tuple[str, Path]] = []  # (temporary file, target), in the order opened

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike) -> Iterator[BinaryIO]:
        """A new binary file that will replace ``path``; flushed and fsynced when its block ends."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as error:  # it would name the temporary file, which the caller never asked for
            raise OSError(error.errno, error.strerror, str(path)) from error
        self._pending.append((tmp, path))  # before any write, so that a failed write removes it too
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def __enter__(self) -> StagedWrites:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            while exc_type is None and self._pending:
                os.replace(*self._pending[0])
                self._pending.pop(0)
        finally:  # an exception in the block, or a failed rename: nothing staged is left behind
            for tmp, _ in self._pending:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            self._pending.clear()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write in pieces (streaming): a temporary file beside ``path``, fsynced and renamed
    onto ``path`` when the ``with`` block ends cleanly, removed when it raises (``path`` is left untouched)."""
    with StagedWrites() as staged, staged.open(path) as f:
        yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def figure_png(figure, dpi: int = 110) -> bytes:
    """A matplotlib Figure rendered to PNG bytes (Agg; no display)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask

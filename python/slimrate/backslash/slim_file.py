"""Reading .slim files lazily (docs/slim-format.md): SlimFile memory-maps the file, validates its index once,
and decodes one tensor per get_tensor call, like safetensors' safe_open; load_slim and slim_report go through it.
"""

from __future__ import annotations

import math
import mmap
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from slimrate.backslash.slim_coding import RAW_DTYPES, SlimFormatError, decode_payload, raw_to_tensor
from slimrate.backslash.slim_layout import read_index

# The default limit on the bytes a file's tensors may decode to (docs/slim-format.md §9): raw payloads decode to
# 1× their size and EG0 spends ≥ 1 bit per element (≤ 64× for float64), so only rANS on near-constant tensors
# goes beyond 256× the file; the 1 GiB floor lets a small file of such tensors load.
MAX_BYTES_FLOOR = 2**30
MAX_BYTES_PER_FILE_BYTE = 256


def default_max_bytes(file_nbytes: int) -> int:
    """max(1 GiB, 256 × the file's size): the decoded bytes SlimFile allows when max_bytes is None."""
    return max(MAX_BYTES_FLOOR, MAX_BYTES_PER_FILE_BYTE * file_nbytes)


def check_max_bytes(max_bytes: object) -> None:
    """TypeError/ValueError unless max_bytes is None (the default limit) or a number of bytes ≥ 0 (math.inf: none)."""
    if max_bytes is None:
        return
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)):
        raise TypeError(f"max_bytes: expected a number of bytes, math.inf or None, got {type(max_bytes).__name__}")
    if not max_bytes >= 0:  # NaN too
        raise ValueError(f"max_bytes: expected a number of bytes >= 0 (math.inf: no limit), got {max_bytes!r}")


def _check_decoded_bytes(entries: list[dict], max_bytes: float | None, file_nbytes: int) -> None:
    """SlimFormatError when the tensors the index declares decode to more than the limit."""
    claims = [(math.prod(e["shape"]) * RAW_DTYPES[e["dtype"]].itemsize, e["name"]) for e in entries]
    total = sum(nbytes for nbytes, _ in claims)
    limit = default_max_bytes(file_nbytes) if max_bytes is None else max_bytes
    if total > limit:
        largest, name = max(claims)
        which = (f"the default, max(1 GiB, {MAX_BYTES_PER_FILE_BYTE} × the file's {file_nbytes} bytes)"
                 if max_bytes is None else "max_bytes")
        raise SlimFormatError(f"the index declares {total} bytes of decoded tensors (the largest, {name!r:.200}, "
                              f"claims {largest} bytes), above the limit of {limit} bytes ({which}); if you trust "
                              "this file, pass a larger max_bytes= (math.inf: no limit; on the command line "
                              "--max-bytes)")


class SlimFile:
    """A .slim file (version 1 or 2) opened for reading tensors one at a time.

    The file is memory-mapped (copy-on-write, so decoders share its pages without a copy) and its index
    validated on opening: a truncated or corrupt file raises SlimFormatError (a ValueError) naming the file here,
    a corrupt payload when that tensor is read; a missing file raises FileNotFoundError. Use it as a context
    manager, or call close().

    max_bytes: the most bytes the file's tensors may decode to, Σ numel × itemsize over the index, checked on
    opening before anything is decoded; None = max(1 GiB, 256 × the file's size) (docs/slim-format.md §9);
    math.inf for no limit.
    """

    def __init__(self, path: str | os.PathLike, *, max_bytes: float | None = None):
        check_max_bytes(max_bytes)
        self.path = Path(path)
        with open(self.path, "rb") as f:
            file_nbytes = os.fstat(f.fileno()).st_size
            if file_nbytes == 0:
                raise SlimFormatError(f"{self.path}: an empty file, not a .slim file")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        with self._naming_the_file():
            entries, self._metadata = read_index(memoryview(self._map))
            _check_decoded_bytes(entries, max_bytes, file_nbytes)
        self._entries = {entry["name"]: entry for entry in entries}

    def __enter__(self) -> SlimFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Drop the mapping; it is unmapped as soon as no decoder still holds a view of it (a tensor being
        decoded when an error was raised, say), so closing never fails."""
        self._map = None

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._entries)

    def metadata(self) -> dict[str, str]:
        """The str → str metadata stored by the writer ({} for a version-1 file)."""
        return dict(self._metadata)

    def info(self, name: str) -> dict:
        """shape (tuple), dtype (name, e.g. "bfloat16"), coder ("raw", "eg", "eg-signed", "rans"), step (Δ or
        None), nbytes (payload bytes, the "eg" table included) of one tensor, from the index; nothing is decoded."""
        entry = self._entry(name)
        return {"shape": tuple(entry["shape"]), "dtype": entry["dtype"], "coder": entry["coder"], "step": entry["step"],
                "nbytes": entry["nbytes"]}

    def get_tensor(self, name: str, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """Decode one tensor: its payload checksum is verified, then only its payload is decoded.

        Returns the stored shape and dtype on the CPU, converted with ``.to(device, dtype)`` when given: dtype=
        converts the stored values (exact when widening, e.g. bfloat16 → float32; one more rounding when not)."""
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
        entry = self._entry(name)
        start, end = entry["offset"], entry["offset"] + entry["nbytes"]
        payload = memoryview(self._map)[start:end]  # a view: nothing is copied
        with self._naming_the_file(name):
            if zlib.crc32(payload) != entry["crc32"]:
                raise SlimFormatError("payload checksum mismatch, the file is corrupt")
            if entry["coder"] == "raw":
                t = raw_to_tensor(payload, entry["shape"], entry["dtype"])
            else:
                numel = math.prod(entry["shape"])
                t = decode_payload(payload, entry, numel, RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        del payload
        self._release(start, end)
        return t if device is None and dtype is None else t.to(device=device, dtype=dtype)

    @contextmanager
    def _naming_the_file(self, tensor: str | None = None) -> Iterator[None]:
        """A SlimFormatError raised inside names this file, and the tensor being read if any: once, here, for every
        check of the index and the payloads."""
        try:
            yield
        except SlimFormatError as e:
            raise SlimFormatError(f"{self.path}: {'' if tensor is None else f'tensor {tensor!r}: '}{e}") from None

    def _release(self, start: int, end: int) -> None:
        """Drop the mapped pages of bytes [start, end) (unmodified: the file is re-read if they are needed again),
        so that reading a file tensor by tensor holds one payload in memory, not every page read so far."""
        aligned = start - start % mmap.PAGESIZE
        if end > aligned:
            self._map.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)

    def _entry(self, name: str) -> dict:
        if self._map is None:
            raise ValueError(f"SlimFile({self.path}) is closed; open it again to read tensors")
        if name not in self._entries:
            raise ValueError(f"name: no tensor {name!r} in {self.path}; it holds {len(self._entries)} tensors, "
                             f"e.g. {list(self._entries)[:5]} (see .keys())")
        return self._entries[name]


def load_slim(path: str | os.PathLike, map_location: str | torch.device | None = None, *,
              max_bytes: float | None = None) -> dict[str, torch.Tensor]:
    """Read a .slim file into a state dict (name → tensor in its original dtype and shape).

    map_location: device for the tensors, as in torch.load (a str or torch.device); None = CPU.
    max_bytes: the most bytes the tensors may decode to, checked before anything is decoded (SlimFile); None =
    max(1 GiB, 256 × the file's size), math.inf = no limit.
    Raises SlimFormatError (a ValueError) naming the file when it is truncated, corrupt or above max_bytes."""
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location: expected a str or torch.device, got {type(map_location).__name__}")
    with SlimFile(path, max_bytes=max_bytes) as f:
        return {name: f.get_tensor(name, device=map_location) for name in f.keys()}


def slim_report(path: str | os.PathLike) -> list[dict]:
    """Per-tensor sizes of a .slim file, from its (validated) index; payloads are not decoded.

    Each dict: name, shape, dtype, coder, step, bytes (payload, incl. the "eg" table), bits_per_param,
    stored_bits (bits per element of the stored dtype: bfloat16 = 16), ratio (fp32 storage bytes / payload
    bytes; inf for an empty payload). Nothing is decoded, so no max_bytes limit applies."""
    with SlimFile(path, max_bytes=math.inf) as f:
        rows = [{"name": name, **f.info(name)} for name in f.keys()]
    for row in rows:
        numel, nbytes = math.prod(row["shape"]), row.pop("nbytes")
        row.update(bytes=nbytes, bits_per_param=8 * nbytes / numel if numel else 0.0,
                   stored_bits=8 * RAW_DTYPES[row["dtype"]].itemsize, ratio=4 * numel / nbytes if nbytes else math.inf)
    return rows

"""Tensor ↔ payload bytes for the .slim format: raw storage and the three entropy coders.

Coders (docs/backslash.md §6; byte layouts in docs/slim-format.md §5–§7). q = round(θ/Δ) is split into
chunks of ``chunk_numel`` symbols, each coded on its own; payload = [table (``"eg"`` only)][chunk 0][chunk 1]…
- ``"raw"``: lossless, the tensor's bytes in little-endian order (bfloat16 as its 16-bit pattern).
- ``"eg"``: the paper's Algorithm 2. The distinct symbols of the whole tensor sorted by descending frequency
  (ties: smaller value first) form the table, rank 0 = most frequent, coded once as signed EG0; each chunk is
  the unsigned EG0 code of its symbols' ranks. The table is counted in the size.
- ``"eg-signed"``: each chunk is the signed EG0 code of its q (zig-zag), no table: cheaper for tiny tensors.
- ``"rans"``: each chunk is ``ops.rans_encode`` of its q (it carries its own frequency table).

All entropy coding goes through ``encode_payload`` and ``decode_payload``, i.e. the fused ops
``ops.slim_encode`` / ``ops.slim_decode``.
"""

from __future__ import annotations

import sys

import torch

from slimrate import ops

RAW_DTYPES = {dtype_name: getattr(torch, dtype_name) for dtype_name in [
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]}
QUANTIZABLE_DTYPES = {"float64", "float32", "float16", "bfloat16"}
CODERS = ("eg", "eg-signed", "rans")


class SlimFormatError(ValueError):
    """A .slim file is truncated, corrupt or not a .slim file."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in RAW_DTYPES:
        raise ValueError(f"dtype: .slim stores {sorted(RAW_DTYPES)}, got {name}; convert the tensor first")
    return name


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError(".slim stores little-endian bytes; this host is big-endian and is not supported")


def raw_payload(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, C order, little-endian: a view of its memory (copied only to reach the CPU or C order)."""
    _check_little_endian()
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def raw_to_tensor(data: memoryview, shape: list[int], dtype: str) -> torch.Tensor:
    """A tensor of ``shape`` and dtype name ``dtype`` that owns a copy of ``data`` (a raw payload whose size the
    index check matched to shape × dtype); SlimFormatError for a bool byte other than 0 or 1."""
    _check_little_endian()
    if not data:
        return torch.empty(shape, dtype=RAW_DTYPES[dtype])
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if dtype == "bool" and int(t.max()) > 1:  # torch would keep the byte: a "bool" that is neither 0 nor 1
        raise SlimFormatError(f"a bool payload holds byte {int(t.max())}; bools are stored as 0 or 1")
    return t.view(RAW_DTYPES[dtype]).reshape(shape)


def _as_buffer(data: memoryview) -> torch.Tensor:
    """(len(data),) uint8 sharing data's memory (data must be writable, e.g. a copy-on-write mmap)."""
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def encode_payload(t: torch.Tensor, step: float, coder: str, chunk_numel: int | None = None
                   ) -> tuple[memoryview, dict]:
    """Quantize and entropy-code one tensor (``ops.slim_encode``): (payload bytes, index fields).

    t: float tensor, any shape (flattened in C order); step: Δ > 0; coder: "eg" | "eg-signed" | "rans";
    chunk_numel: symbols per independently coded chunk (None: ops.DEFAULT_CHUNK_NUMEL).
    Fields: "chunk_numel", "chunk_nbytes" (one size per chunk), and "table_count", "table_nbytes" for "eg".
    ValueError for a non-finite value or |θ/Δ| ≥ 2^31 − 1, naming its flat index, or another coder (the op's
    checks).
    """
    chunk_numel = ops.DEFAULT_CHUNK_NUMEL if chunk_numel is None else chunk_numel
    payload, layout = ops.slim_encode(t.detach().to("cpu"), step, coder, chunk_numel)
    table_count, table_nbytes, *chunk_nbytes = layout.tolist()
    fields = {"table_count": table_count, "table_nbytes": table_nbytes} if coder == "eg" else {}
    fields.update(chunk_numel=chunk_numel, chunk_nbytes=chunk_nbytes)
    return memoryview(payload.numpy()), fields


def decode_payload(view: memoryview, entry: dict, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An entropy-coded payload → θ̂ (numel,) of dtype: q·Δ in float64, rounded once to dtype (``ops.slim_decode``,
    the chunks decoded in parallel).

    view: the payload's entry["nbytes"] bytes, checksum already verified (writable: it is shared, not copied);
    entry: a validated index entry (slim_layout.read_index: chunk sizes tile the payload, symbol counts fit).
    Every decoder error becomes SlimFormatError.
    """
    if numel == 0:  # no chunks; version 1 wrote an 8-byte rANS buffer for an empty tensor, nothing to decode
        return torch.empty(0, dtype=dtype)
    layout = torch.tensor([entry.get("table_count", 0), entry.get("table_nbytes", 0), *entry["chunk_nbytes"]],
                          dtype=torch.int64)
    try:
        return ops.slim_decode(_as_buffer(view), layout, numel, entry["step"], entry["coder"], entry["chunk_numel"],
                               dtype)
    except ValueError as e:
        raise SlimFormatError(f"corrupt {entry['coder']} payload ({e})") from None

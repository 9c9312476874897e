"""Tensor ↔ payload bytes for the .slim format: raw storage and the three entropy coders.

Coders (docs/backslash.md §6; byte layouts in docs/slim-format.md §5–§7). q = round(θ/Δ) is split into
chunks of ``chunk_numel`` symbols, each coded on its own; payload = [table (``"eg"`` only)][chunk 0][chunk 1]…
- ``"raw"``: lossless, the tensor's bytes in little-endian order (bfloat16 as its 16-bit pattern).
- ``"eg"``: the paper's Algorithm 2. The distinct symbols of the whole tensor sorted by descending frequency
  (ties: smaller value first) form the table, rank 0 = most frequent, coded once as signed EG0; each chunk is
  the unsigned EG0 code of its symbols' ranks. The table is counted in the size.
- ``"eg-signed"``: each chunk is the signed EG0 code of its q (zig-zag), no table: cheaper for tiny tensors.
- ``"rans"``: each chunk is ``ops.rans_encode`` of its q (it carries its own frequency table).

All entropy coding goes through ``encode_payload`` and ``decode_payload``.
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
    """A tensor of ``shape`` and dtype name ``dtype`` that owns a copy of ``data`` (a raw payload)."""
    _check_little_endian()
    if not data:
        return torch.empty(shape, dtype=RAW_DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(RAW_DTYPES[dtype]).reshape(shape)


def _as_buffer(data: memoryview) -> torch.Tensor:
    """(len(data),) uint8 sharing data's memory (data must be writable, e.g. a copy-on-write mmap)."""
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def frequency_table(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, ranks): table (n_distinct,) int32 sorted by descending count, ties by value; ranks like q."""
    values, inverse, counts = torch.unique(q, return_inverse=True, return_counts=True)  # values ascending
    order = torch.sort(-counts, stable=True).indices                # stable: equal counts keep value order
    rank_of_value = torch.empty_like(order)
    rank_of_value[order] = torch.arange(order.numel())
    return values[order].to(torch.int32), rank_of_value[inverse].to(torch.int32)


def _encode_chunk(symbols: torch.Tensor, coder: str) -> torch.Tensor:
    """symbols (n,) int32 (ranks for "eg") → the chunk's bytes, (nbytes,) uint8."""
    if coder == "rans":
        return ops.rans_encode(symbols)
    return ops.eg_encode(symbols, signed=coder == "eg-signed")


def encode_payload(t: torch.Tensor, step: float, coder: str, chunk_numel: int | None = None
                   ) -> tuple[memoryview, dict]:
    """Quantize and entropy-code one tensor: (payload bytes, index fields).

    t: float tensor, any shape (flattened in C order); step: Δ > 0; coder: "eg" | "eg-signed" | "rans";
    chunk_numel: symbols per independently coded chunk, None = one chunk (max(numel, 1)).
    Fields: "chunk_numel", "chunk_nbytes" (one size per chunk), and "table_count", "table_nbytes" for "eg".
    ValueError (from ops.quantize) for a non-finite value or |θ/Δ| ≥ 2^31 − 1.

    Target of the fused op: ``payload, layout = ops.slim_encode(t, step, coder, chunk_numel)`` with
    layout = [table_count, table_nbytes, chunk_nbytes_0, ...]; the fields are read off layout.
    """
    if coder not in CODERS:
        raise ValueError(f"coder: expected one of {CODERS}, got {coder!r}")
    q = ops.quantize(t.detach().to("cpu").reshape(-1), step)
    chunk_numel = max(q.numel(), 1) if chunk_numel is None else chunk_numel
    parts, fields = [], {}
    if coder == "eg":
        table, q = frequency_table(q)  # from here on q holds the ranks
        parts.append(ops.eg_encode(table, signed=True))
        fields = {"table_count": table.numel(), "table_nbytes": parts[0].numel()}
    chunks = [_encode_chunk(q[i:i + chunk_numel], coder) for i in range(0, q.numel(), chunk_numel)]
    fields.update(chunk_numel=chunk_numel, chunk_nbytes=[chunk.numel() for chunk in chunks])
    payload = torch.cat([torch.empty(0, dtype=torch.uint8), *parts, *chunks])
    return memoryview(payload.numpy()), fields


def _decode_chunk(buf: torch.Tensor, coder: str, count: int, table: torch.Tensor | None, where: str) -> torch.Tensor:
    """One chunk's bytes → its q, (count,) int32."""
    if coder == "rans":
        return ops.rans_decode(buf, count)
    if coder == "eg-signed":
        return ops.eg_decode(buf, count, signed=True)
    ranks = ops.eg_decode(buf, count, signed=False)
    if ranks.numel() and int(ranks.max()) >= table.numel():
        raise SlimFormatError(f"{where}: rank {int(ranks.max())} outside the table of {table.numel()}")
    return table[ranks.long()]


def _rans_count(chunk: memoryview) -> int | None:
    """The symbol count a rans_encode buffer declares (a mode byte, then a varint); None if it is cut short."""
    count = 0
    for i, byte in enumerate(chunk[1:11]):
        count |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return count
    return None


def _check_rans_counts(view: memoryview, entry: dict, numel: int) -> None:
    """Each chunk's own count is its share of numel: rANS can code any count in a few bytes, so this (with the
    index checksum) is what vouches for numel before the output is allocated."""
    pos, chunk_numel = 0, entry["chunk_numel"]
    for c, nbytes in enumerate(entry["chunk_nbytes"]):
        declared, expected = _rans_count(view[pos:pos + nbytes]), min(chunk_numel, numel - c * chunk_numel)
        if declared != expected:
            raise SlimFormatError(f"tensor {entry['name']!r} chunk {c}: the rANS buffer holds {declared} symbols, "
                                  f"the index says {expected}")
        pos += nbytes


def decode_payload(view: memoryview, entry: dict, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An entropy-coded payload → θ̂ (numel,) of dtype: q·Δ in float64, rounded once to dtype (ops.dequantize).

    view: the payload's entry["nbytes"] bytes, checksum already verified (writable: it is shared, not copied);
    entry: a validated index entry (slim_layout.read_index: chunk sizes tile the payload, symbol counts fit).
    Chunks are decoded one after another, the "eg" table once; every decoder error becomes SlimFormatError.

    Target of the fused op: ``ops.slim_decode(payload, layout, numel, entry["step"], entry["coder"],
    entry["chunk_numel"], dtype)`` with layout = [table_count, table_nbytes, *chunk_nbytes].
    """
    coder, chunk_numel = entry["coder"], entry["chunk_numel"]
    if coder == "rans":
        _check_rans_counts(view, entry, numel)
    buf, table, pos, where = _as_buffer(view), None, 0, f"tensor {entry['name']!r} table"
    out = torch.empty(numel, dtype=dtype)  # numel is bounded by the payload's size (eg) or its chunks' counts
    try:
        if coder == "eg":
            pos = entry["table_nbytes"]
            table = ops.eg_decode(buf[:pos], entry["table_count"], signed=True)
        for c, nbytes in enumerate(entry["chunk_nbytes"]):
            start, where = c * chunk_numel, f"tensor {entry['name']!r} chunk {c}"
            count = min(chunk_numel, numel - start)
            q = _decode_chunk(buf[pos:pos + nbytes], coder, count, table, where)
            out[start:start + count] = ops.dequantize(q, entry["step"], dtype=dtype)
            pos += nbytes
    except SlimFormatError:
        raise
    except ValueError as e:
        raise SlimFormatError(f"{where}: corrupt {coder} payload ({e})") from None
    return out

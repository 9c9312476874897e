"""Tensor ↔ payload bytes for the .slim format (slim_format.py): raw storage and the three entropy coders.

Coders (docs/backslash.md §6; byte layouts in docs/slim-format.md §5–§7):
- ``"raw"``: lossless, the tensor's bytes in little-endian order (bfloat16 as its 16-bit pattern).
- ``"eg"``: the paper's Algorithm 2. q = round(θ/Δ); the distinct symbols sorted by descending frequency
  (ties: smaller value first) form the table, rank 0 = most frequent; each q is coded as EG0 of its rank
  (unsigned). Payload = [table: signed EG0 of the table values][ranks: EG0], the table counted in the size.
- ``"eg-signed"``: plain signed EG0 of q (zig-zag), no table: cheaper for tiny tensors.
- ``"rans"``: ``ops.rans_encode`` of q (it carries its own frequency table).
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


def tensor_to_raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes, C order, little-endian."""
    _check_little_endian()
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def raw_to_tensor(data: bytes | memoryview, shape: list[int], name: str) -> torch.Tensor:
    _check_little_endian()
    dtype = RAW_DTYPES[name]
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _as_bytes(buf: torch.Tensor) -> bytes:
    return buf.numpy().tobytes()


def _as_buffer(data: bytes | memoryview) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def frequency_table(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, ranks): table (n_distinct,) int32 sorted by descending count, ties by value; ranks like q."""
    values, inverse, counts = torch.unique(q, return_inverse=True, return_counts=True)  # values ascending
    order = torch.sort(-counts, stable=True).indices                # stable: equal counts keep value order
    rank_of_value = torch.empty_like(order)
    rank_of_value[order] = torch.arange(order.numel())
    return values[order].to(torch.int32), rank_of_value[inverse].to(torch.int32)


def encode_symbols(q: torch.Tensor, coder: str) -> tuple[bytes, dict]:
    """q (n,) int32 → (payload, extra header fields)."""
    if coder == "eg":
        table, ranks = frequency_table(q)
        table_bytes = _as_bytes(ops.eg_encode(table, signed=True))
        return table_bytes + _as_bytes(ops.eg_encode(ranks, signed=False)), {
            "table_count": table.numel(), "table_nbytes": len(table_bytes)}
    if coder == "eg-signed":
        return _as_bytes(ops.eg_encode(q, signed=True)), {}
    if coder == "rans":
        return _as_bytes(ops.rans_encode(q)), {}
    raise ValueError(f"coder: expected one of {CODERS}, got {coder!r}")


def check_symbol_count(entry: dict, numel: int) -> None:
    """Refuse, before any allocation, counts the payload cannot hold: an EG0 code takes ≥ 1 bit per symbol.

    rANS codes a very skewed tensor in < 1 bit per symbol, so for "rans" only the header checksum vouches for the
    shape."""
    nbytes, where = entry["nbytes"], f"tensor {entry['name']!r}"
    if entry["coder"] == "eg":
        table_count, table_nbytes = entry["table_count"], entry["table_nbytes"]
        if not (0 <= table_nbytes <= nbytes and 0 <= table_count <= min(numel, 8 * table_nbytes)
                and (table_count > 0 or numel == 0) and numel <= 8 * (nbytes - table_nbytes)):
            raise SlimFormatError(f"{where}: table of {table_count} symbols in {table_nbytes} bytes does not fit "
                                  f"{numel} symbols in {nbytes} bytes")
    elif entry["coder"] == "eg-signed" and numel > 8 * nbytes:
        raise SlimFormatError(f"{where}: {numel} symbols cannot fit in {nbytes} bytes")


def decode_symbols(payload: bytes | memoryview, entry: dict, numel: int) -> torch.Tensor:
    """payload → q (numel,) int32; every decoder error becomes SlimFormatError."""
    coder, where = entry["coder"], f"tensor {entry['name']!r}"
    check_symbol_count(entry, numel)
    try:
        if coder == "eg":
            split = entry["table_nbytes"]
            table = ops.eg_decode(_as_buffer(payload[:split]), entry["table_count"], signed=True)
            ranks = ops.eg_decode(_as_buffer(payload[split:]), numel, signed=False)
            if ranks.numel() and int(ranks.max()) >= table.numel():
                raise SlimFormatError(f"{where}: rank {int(ranks.max())} outside the table of {table.numel()}")
            return table[ranks.long()]
        if coder == "eg-signed":
            return ops.eg_decode(_as_buffer(payload), numel, signed=True)
        return ops.rans_decode(_as_buffer(payload), numel)
    except SlimFormatError:
        raise
    except ValueError as e:
        raise SlimFormatError(f"{where}: corrupt {coder} payload ({e})") from None


def quantize_tensor(t: torch.Tensor, step: float, name: str) -> torch.Tensor:
    """θ → q = round(θ/Δ), (n,) int32, θ/Δ in float64 (ops.quantize); its refusals (NaN/inf, int32 overflow)
    are re-raised naming the tensor."""
    try:
        return ops.quantize(t.detach().to("cpu").reshape(-1), step)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def dequantize_tensor(q: torch.Tensor, step: float, shape: list[int], dtype: str) -> torch.Tensor:
    """q (n,) int32 → θ̂ = q·Δ in float64, rounded once to the tensor's original dtype (ops.dequantize)."""
    return ops.dequantize(q, step, dtype=RAW_DTYPES[dtype]).reshape(shape)

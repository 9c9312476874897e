"""Quantization and lossless entropy coding of int32 symbol streams (docs/backslash.md §6, docs/slim-format.md §6–§7).

- ``quantize`` / ``dequantize``: uniform scalar quantizer q = round(x/Δ), x̂ = q·Δ (plain PyTorch, any device);
- ``eg_encode`` / ``eg_decode`` / ``eg_code_length``: exp-Golomb codes of order k, MSB first;
- ``rans_encode`` / ``rans_decode``: a static rANS coder whose buffer carries its own frequency table;
- ``slim_encode`` / ``slim_decode``: a whole float tensor ↔ the payload of a .slim entry, i.e. quantization
  and one of the coders above, fused, in independently coded chunks.

The coders run on the CPU only (C++ in csrc/core/entropy.cpp and slim_codec.cpp): bit-serial coding has
no CUDA or Triton kernel, so ``backend`` is "native" (default) or "reference" (plain Python).
"""

from __future__ import annotations

import math

import torch

from slimrate.ops.backend import extension_available, pick_backend
from slimrate.ops.checks import FLOAT_DTYPES, bool_arg, check_tensor, dtype_names, finite_number, int_arg

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_EG_ORDER = 31  # keeps every code ≤ 64 bits (csrc/kernels/entropy_eg.h)
SLIM_CODERS = ("eg", "eg-signed", "rans")
# Symbols per independently coded chunk of slim_encode.  Chunking costs each chunk ≤ 1 byte of padding (eg,
# eg-signed) or its own rANS header (~2 bytes per distinct symbol); measured on N(0, 0.02²) bfloat16 weights at
# Δ = 0.002 (4096×4096 and 11008×4096, 5.37 bits/param), rANS pays +0.028% over one chunk at 2^20, +0.12% at
# 2^18, +0.48% at 2^16, eg and eg-signed < 0.0001%.  2^20 keeps that far under 0.5% and still gives a 4096×4096
# matrix 16 chunks to spread over the cores.
DEFAULT_CHUNK_NUMEL = 1 << 20
_CPU = torch.device("cpu")


def _stream(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` checked to be a 1-D CPU tensor of ``dtype`` (symbols int32, buffers uint8)."""
    return check_tensor(name, t, dtypes=(dtype,), device=_CPU, shape=(None,))


def quantize(x: torch.Tensor, step: float) -> torch.Tensor:
    """Uniform scalar quantization q = round(x / step), ties to even (torch.round).

    x: float tensor of any shape and device; step > 0.  x/step is computed in float64.
    Returns int32, x's shape and device.  Raises ValueError naming the flat index of the first element that is
    not finite or has |x/step| ≥ 2^31 − 1.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a float tensor, got {x.dtype}")
    step = finite_number("step", step, positive=True)
    y = x.double() / step
    fits = y.abs() < INT32_MAX  # False for NaN and ±inf too
    if not bool(fits.all()):
        i = int((~fits).flatten().nonzero()[0])
        value = float(x.flatten()[i])
        if not math.isfinite(value):
            raise ValueError(f"x: expected finite values, got {value} at flat index {i}")
        raise ValueError(f"x/step: |x|/step = {abs(float(y.flatten()[i])):.4g} at flat index {i} is not below "
                         f"2^31 - 1, so it has no int32 symbol; use a larger step (got {step:g})")
    return torch.round(y).to(torch.int32)


def dequantize(q: torch.Tensor, step: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ = q · step, computed in float64 and rounded once to ``dtype``; q int32 of any shape/device."""
    check_tensor("q", q, dtypes=(torch.int32,))
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a float dtype, got {dtype}")
    step = finite_number("step", step, positive=True)
    return (q.double() * step).to(dtype)


def eg_code_length(symbols: torch.Tensor, k: int = 0, signed: bool = True, *, backend: str | None = None) -> int:
    """Exact length in bits of ``eg_encode(symbols, k, signed)`` before padding, without encoding.

    symbols: (n,) int32 on the CPU.  Raises ValueError for a symbol with no code (see eg_encode).
    """
    _stream("symbols", symbols, torch.int32)
    k = int_arg("k", k, 0, MAX_EG_ORDER)
    signed = bool_arg("signed", signed)
    return int(pick_backend("eg_code_length", backend, _CPU)(symbols, k, signed))


def eg_encode(symbols: torch.Tensor, k: int = 0, signed: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """Exp-Golomb code of order k (docs/slim-format.md §6), MSB first, the last byte zero-padded.

    symbols: (n,) int32 on the CPU.  signed=True zig-zag maps s to u = 2s (s ≥ 0), −2s − 1 (s < 0)
    and rejects INT32_MIN; signed=False needs s ≥ 0.  u is written as w = u + 2^k in ⌊log2 w⌋+1 bits
    after ⌊log2 w⌋ − k zeros, k ∈ [0, 31].  Returns (⌈eg_code_length/8⌉,) uint8; the native backend
    encodes 64 Ki-symbol chunks in parallel, the output independent of the thread count.
    """
    _stream("symbols", symbols, torch.int32)
    k = int_arg("k", k, 0, MAX_EG_ORDER)
    signed = bool_arg("signed", signed)
    return pick_backend("eg_encode", backend, _CPU)(symbols, k, signed)


def eg_decode(buf: torch.Tensor, count: int, k: int = 0, signed: bool = True, *,
              backend: str | None = None) -> torch.Tensor:
    """Decode the ``count`` symbols of an ``eg_encode(…, k, signed)`` stream, which must fill buf exactly.

    buf: (nbytes,) uint8 on the CPU.  Returns (count,) int32.  Sequential (one stream has no chunk
    offsets).  Raises ValueError when the bits run out, a prefix has more than 32 zeros, a value
    is not a symbol eg_encode writes, or bits follow the last code other than its byte's zero padding
    (a padded stream, or a count below the stream's) — never reads outside buf.
    """
    _stream("buf", buf, torch.uint8)
    count = int_arg("count", count, 0, INT64_MAX)
    k = int_arg("k", k, 0, MAX_EG_ORDER)
    signed = bool_arg("signed", signed)
    return pick_backend("eg_decode", backend, _CPU)(buf, count, k, signed)


def rans_encode(symbols: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Static rANS coding of int32 symbols into one self-contained byte buffer.

    symbols: (n,) int32 on the CPU.  The buffer holds the count, the alphabet (delta varints) and
    frequencies quantized to 2^16 (more for alphabets above 2^15 symbols), then a 32-bit-state,
    byte-renormalised rANS stream (Duda 2013; ryg_rans).  When more than half the symbols are distinct
    the symbols are stored raw instead.  Layout: csrc/kernels/entropy_rans.h.  Sequential.
    Returns (nbytes,) uint8.
    """
    _stream("symbols", symbols, torch.int32)
    return pick_backend("rans_encode", backend, _CPU)(symbols)


def rans_decode(buf: torch.Tensor, count: int, *, backend: str | None = None) -> torch.Tensor:
    """Decode a ``rans_encode`` buffer of ``count`` symbols into (count,) int32.

    Raises ValueError for a count other than the buffer's, a truncated or padded buffer (always detected), a
    corrupt header or stream, or a stream too short for its count with its frequency table; the header and the
    stream's length are checked before the output is allocated.  A corrupted payload may also decode to other
    symbols, never out of bounds.
    """
    _stream("buf", buf, torch.uint8)
    count = int_arg("count", count, 0, INT64_MAX)
    return pick_backend("rans_decode", backend, _CPU)(buf, count)


def _slim_coder(coder: object) -> str:
    if coder not in SLIM_CODERS:
        raise ValueError(f"coder: expected one of {SLIM_CODERS}, got {coder!r}")
    return coder


def slim_encode(x: torch.Tensor, step: float, coder: str, chunk_numel: int = DEFAULT_CHUNK_NUMEL, *,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A float tensor → the payload of a .slim entry (docs/slim-format.md): q = round(x/step) as ``quantize``,
    flattened in C order, coded in chunks of ``chunk_numel`` symbols, each on its own.

    x: float16/bfloat16/float32/float64 CPU tensor of any shape and strides; step > 0; coder "eg" (signed EG0
    table of the distinct symbols by descending count over the whole tensor, ties by smaller value, then each
    chunk's ranks as unsigned EG0), "eg-signed" (each chunk's signed EG0) or "rans" (each chunk's
    ``rans_encode``); chunk_numel ≥ 1.  Returns (payload, layout): payload (nbytes,) uint8 = [table][chunk 0]
    [chunk 1]..., layout (2 + ⌈numel/chunk_numel⌉,) int64 = [table_count, table_nbytes, chunk_nbytes...] (the
    table fields 0 but for "eg").  One chunk (chunk_numel ≥ numel) gives v1's payload.  The bytes depend only
    on the arguments, not on the thread count.  The native backend quantizes, checks and counts in one pass per
    chunk without a float64 copy, and codes the chunks in parallel.  Raises ValueError naming the flat index of
    the first element that is not finite, has |x/step| ≥ 2^31 − 1, or whose q·step (float64, rounded once to x's
    dtype, as slim_decode computes it) overflows x's dtype — e.g. float16 65504 with step 2^15 — so the decoded
    tensor is always finite and within step/2 of x plus half an ulp of its dtype.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, device=_CPU)
    step = finite_number("step", step, positive=True)
    coder = _slim_coder(coder)
    chunk_numel = int_arg("chunk_numel", chunk_numel, 1, INT64_MAX)
    return pick_backend("slim_encode", backend, _CPU)(x.detach(), step, coder, chunk_numel)


def slim_decode(payload: torch.Tensor, layout: torch.Tensor, numel: int, step: float, coder: str, chunk_numel: int,
                dtype: torch.dtype, *, backend: str | None = None) -> torch.Tensor:
    """The inverse of ``slim_encode``: (numel,) tensor of ``dtype``, x̂ = q·step computed in float64 and rounded
    once to dtype (exactly ``dequantize``).

    payload (nbytes,) uint8 and layout int64 on the CPU, as slim_encode returned them; numel ≥ 0, step, coder and
    chunk_numel as they were encoded.  The native backend decodes the chunks in parallel straight into dtype.
    Raises ValueError for every inconsistency of payload, layout and numel (layout length, table or chunk sizes,
    trailing bytes or non-zero padding, a corrupt or truncated chunk, a rank outside the table, a q·step that
    overflows dtype), never reading out of bounds.  Every size is checked against the payload before the output
    is allocated (each rANS chunk's whole header too); it decodes 2^16 symbols at a time, so it needs the output
    and 256 KiB of scratch per thread.
    """
    _stream("payload", payload, torch.uint8)
    _stream("layout", layout, torch.int64)
    numel = int_arg("numel", numel, 0, INT64_MAX)
    step = finite_number("step", step, positive=True)
    coder = _slim_coder(coder)
    chunk_numel = int_arg("chunk_numel", chunk_numel, 1, INT64_MAX)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected {dtype_names(FLOAT_DTYPES)}, got {dtype}")
    return pick_backend("slim_decode", backend, _CPU)(payload, layout, numel, step, coder, chunk_numel, dtype)


def check_slim_layout(payload: torch.Tensor, layout: torch.Tensor, numel: int, step: float, coder: str,
                      chunk_numel: int, dtype: torch.dtype) -> None:
    """The checks of layout against numel, chunk_numel and the payload's size that slim_decode's native glue
    makes (csrc/coding_inputs.h), run before the reference backend (ops/backend.py DATA_CHECKS)."""
    count = -(-numel // chunk_numel)
    if layout.numel() != 2 + count:
        raise ValueError(f"layout: expected 2 + {count} entries (numel {numel} in chunks of {chunk_numel}), got "
                         f"{layout.numel()}")
    nbytes = payload.numel()
    table_count, table_nbytes, *sizes = layout.tolist()
    if coder == "eg":
        if not (0 <= table_nbytes <= nbytes and 0 <= table_count <= min(numel, 8 * table_nbytes)
                and (table_count > 0 or numel == 0)):
            raise ValueError(f"layout: a table of {table_count} symbols in {table_nbytes} bytes does not fit "
                             f"{numel} symbols in a payload of {nbytes} bytes")
    elif table_count or table_nbytes:
        raise ValueError(f"layout: coder {coder} has no table, got table_count {table_count} and table_nbytes "
                         f"{table_nbytes}")
    offset = table_nbytes
    for c, size in enumerate(sizes):
        if not 0 <= size <= nbytes - offset:
            raise ValueError(f"layout: chunk {c} of {count} claims {size} bytes at offset {offset} of a payload of "
                             f"{nbytes} bytes")
        length = min(chunk_numel, numel - c * chunk_numel)
        if coder != "rans" and length > 8 * size:
            raise ValueError(f"layout: chunk {c} of {count}: {length} exp-Golomb codes cannot fit in {size} bytes")
        offset += size
    if offset != nbytes:
        raise ValueError(f"payload: {nbytes} bytes, but the layout accounts for {offset} (trailing bytes or a wrong "
                         "layout)")


def rans_header_size(buf: torch.Tensor) -> int:
    """Bytes of a ``rans_encode`` buffer before its rANS stream (mode, count, alphabet, frequencies),
    i.e. the table cost; the rest is the payload.  Raw-mode buffers: the bytes before the raw symbols."""
    data = memoryview(_stream("buf", buf, torch.uint8).contiguous().numpy())  # no copy
    pos = 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            if pos >= len(data):
                raise ValueError(f"buf: truncated rANS header ({len(data)} bytes)")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    mode = varint()  # one byte < 0x80
    varint()  # count
    if mode == 1:
        return pos
    pos += 1  # scale_bits
    m = varint()
    for _ in range(2 * m):  # smallest symbol, m − 1 gaps, m frequencies
        varint()
    return pos


if extension_available():
    # Output sizes of the encoders depend on the data: fakes return unbacked sizes.
    @torch.library.register_fake("slimrate::eg_code_length")
    def _eg_code_length_fake(symbols, k, signed):
        return symbols.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("slimrate::eg_encode")
    def _eg_encode_fake(symbols, k, signed):
        return symbols.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)

    @torch.library.register_fake("slimrate::eg_decode")
    def _eg_decode_fake(buf, count, k, signed):
        return buf.new_empty((count,), dtype=torch.int32)

    @torch.library.register_fake("slimrate::rans_encode")
    def _rans_encode_fake(symbols):
        return symbols.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)

    @torch.library.register_fake("slimrate::rans_decode")
    def _rans_decode_fake(buf, count):
        return buf.new_empty((count,), dtype=torch.int32)

    @torch.library.register_fake("slimrate::slim_encode")
    def _slim_encode_fake(x, step, coder, chunk_numel):
        chunks = (x.numel() + chunk_numel - 1) // chunk_numel
        payload = x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)
        return payload, x.new_empty((2 + chunks,), dtype=torch.int64)

    @torch.library.register_fake("slimrate::slim_decode")
    def _slim_decode_fake(payload, layout, numel, step, coder, chunk_numel, dtype):
        return payload.new_empty((numel,), dtype=dtype)

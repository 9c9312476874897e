"""Quantization and lossless entropy coding of int32 symbol streams (docs/backslash.md §6, docs/slim-format.md §6–§7).

- ``quantize`` / ``dequantize``: uniform scalar quantizer q = round(x/Δ), x̂ = q·Δ (plain PyTorch, any device);
- ``eg_encode`` / ``eg_decode`` / ``eg_code_length``: exp-Golomb codes of order k, MSB first;
- ``rans_encode`` / ``rans_decode``: a static rANS coder whose buffer carries its own frequency table.

The coders run on the CPU only (C++ in csrc/cpu/entropy_cpu.cpp): bit-serial coding has no CUDA or
Triton kernel, so ``backend`` is "native" (default) or "reference" (exp-Golomb only, plain Python).
"""

from __future__ import annotations

import torch

from slimrate.ops.backend import extension_available, pick_backend
from slimrate.ops.checks import bool_arg, check_tensor, finite_number, int_arg

INT32_MAX = 2**31 - 1
MAX_EG_ORDER = 31  # keeps every code ≤ 64 bits (csrc/kernels/entropy_eg.h)
_CPU = torch.device("cpu")


def _stream(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` checked to be a 1-D CPU tensor of ``dtype`` (symbols int32, buffers uint8)."""
    return check_tensor(name, t, dtypes=(dtype,), device=_CPU, shape=(None,))


def quantize(x: torch.Tensor, step: float) -> torch.Tensor:
    """Uniform scalar quantization q = round(x / step), ties to even (torch.round).

    x: float tensor of any shape and device; step > 0.  x/step is computed in float64.
    Returns int32, x's shape and device.  Raises ValueError for non-finite x or |x/step| ≥ 2^31 − 1.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a float tensor, got {x.dtype}")
    step = finite_number("step", step, positive=True)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: expected finite values, got inf or nan")
    y = x.double() / step
    if x.numel() and float(y.abs().max()) >= INT32_MAX:
        raise ValueError(f"x/step: |x|/step reaches {float(y.abs().max()):.4g} >= 2^31 - 1, not an int32 "
                         f"symbol; use a larger step (got {step:g})")
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
    """Decode exactly ``count`` symbols of an ``eg_encode(…, k, signed)`` stream; bits after them are ignored.

    buf: (nbytes,) uint8 on the CPU.  Returns (count,) int32.  Sequential (one stream has no chunk
    offsets).  Raises ValueError when the bits run out, a prefix has more than 32 zeros, or a value
    is not a symbol eg_encode writes — never reads outside buf.
    """
    _stream("buf", buf, torch.uint8)
    count = int_arg("count", count, 0)
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

    Raises ValueError for a count other than the buffer's, a truncated buffer (always detected) or a
    corrupt header or stream; a corrupted payload may also decode to other symbols, never out of bounds.
    """
    _stream("buf", buf, torch.uint8)
    count = int_arg("count", count, 0)
    return pick_backend("rans_decode", backend, _CPU)(buf, count)


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

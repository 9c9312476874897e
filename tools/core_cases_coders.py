"""Case files of the entropy coders and the chunked tensor codec (csrc/core/entropy.h, csrc/core/slim_codec.h) for
the C++ checks of the kernel core; tools/core_cases.py lists them with the other families."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from core_case_file import FLOAT_DTYPES, STATUS, write_case

from slimrate.ops import coding, reference

# ---- entropy coders (csrc/core/entropy.h) ----
# Every stream is written on the host by the plain-Python reference coders: the core must write the same bytes and
# decode them on every architecture. Bytes, counts and symbols are compared exactly.

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def gaussian_symbols(n: int, sigma: float) -> torch.Tensor:
    """Rounded N(0, σ²) int32 symbols: the quantized weights the coders are made for."""
    return torch.round(torch.randn(n, dtype=torch.float64) * sigma).to(torch.int32)


def exact(name: str, value: torch.Tensor | float) -> dict[str, torch.Tensor | float]:
    return {f"expected.{name}": value, f"tol.{name}": 0.0}


def refused(call: Callable[[], object], status: str) -> tuple[object, str]:
    """(call's result, "ok"), or (None, status) when the reference raises ValueError: the status the core returns
    for the same input."""
    try:
        return call(), "ok"
    except ValueError:
        return None, status


def eg_encode_case(folder: Path, label: str, symbols: torch.Tensor, k: int, signed: bool) -> None:
    """The code's length and bytes, and its round trip; bad_value where the reference refuses a symbol."""
    code, status = refused(lambda: reference.eg_encode(symbols, k, signed), "bad_value")
    arrays = {"symbols": symbols, "k": float(k), "signed": float(signed), **exact("status", STATUS[status])}
    if code is not None:
        arrays |= {**exact("bits", float(reference.eg_code_length(symbols, k, signed))), **exact("bytes", code),
                   **exact("symbols", symbols)}
    write_case(folder / f"eg_encode-{label}.case", "eg_encode", arrays)


def eg_decode_case(folder: Path, label: str, buf: torch.Tensor, count: int, k: int, signed: bool) -> None:
    """The reference's symbols, or corrupt_stream where the reference refuses the stream."""
    symbols, status = refused(lambda: reference.eg_decode(buf, count, k, signed), "corrupt_stream")
    write_case(folder / f"eg_decode-{label}.case", "eg_decode", {
        "buf": buf, "count": float(count), "k": float(k), "signed": float(signed), **exact("status", STATUS[status]),
        **({} if symbols is None else exact("symbols", symbols))})


def rans_encode_case(folder: Path, label: str, symbols: torch.Tensor) -> None:
    write_case(folder / f"rans_encode-{label}.case", "rans_encode", {
        "symbols": symbols, **exact("bytes", reference.rans_encode(symbols)), **exact("symbols", symbols)})


def rans_decode_case(folder: Path, label: str, buf: torch.Tensor, count: int) -> None:
    symbols, status = refused(lambda: reference.rans_decode(buf, count), "corrupt_stream")
    write_case(folder / f"rans_decode-{label}.case", "rans_decode", {
        "buf": buf, "count": float(count), **exact("status", STATUS[status]),
        **({} if symbols is None else exact("symbols", symbols))})


def entropy_cases(folder: Path) -> None:
    """Exp-Golomb: every order class on rounded Gaussians, int32 extremes, empty and one-symbol streams, a stream
    over three of the encoder's 64 Ki-symbol chunks (each starting mid-byte), symbols without a code (one in a
    later chunk); decoding host streams and corrupt ones (truncated, padded, a count below the stream's, a prefix
    of more than 32 zeros). rANS: tables whose rounded frequencies are trimmed or topped up, one symbol, raw
    (mode 1) streams, an alphabet over 2^15 (scale_bits 17); decoding host buffers and corrupt ones (truncated,
    padded, miscounted, a bad header, a final state off by one)."""
    small = gaussian_symbols(1000, 6.0)
    extremes = torch.tensor([INT32_MAX, -INT32_MAX, 0, 1, -1, INT32_MAX - 1], dtype=torch.int32)
    for k in (0, 1, 7, 31):
        eg_encode_case(folder, f"k{k}-signed", small, k, True)
        eg_encode_case(folder, f"k{k}-unsigned", small.abs(), k, False)
        eg_encode_case(folder, f"extremes-k{k}", extremes, k, True)
    eg_encode_case(folder, "extremes-unsigned", extremes.abs(), 0, False)
    eg_encode_case(folder, "empty", torch.zeros(0, dtype=torch.int32), 0, True)
    eg_encode_case(folder, "one", torch.tensor([-5], dtype=torch.int32), 3, True)
    eg_encode_case(folder, "3-chunks", gaussian_symbols(150_000, 20.0), 2, True)
    eg_encode_case(folder, "int32-min", torch.cat([small, torch.tensor([INT32_MIN], dtype=torch.int32)]), 0, True)
    negative = gaussian_symbols(70_000, 3.0).abs()
    negative[69_000] = -1
    eg_encode_case(folder, "negative-unsigned", negative, 0, False)

    s = gaussian_symbols(5000, 9.0)
    buf = reference.eg_encode(s, 3, True)
    zeros = torch.tensor([0] * 5 + [255], dtype=torch.uint8)
    for label, (b, count) in {"host": (buf, 5000), "truncated": (buf[:-1], 5000),
                              "padded": (torch.cat([buf, torch.zeros(1, dtype=torch.uint8)]), 5000),
                              "count-below": (buf, 4999), "long-prefix": (zeros, 1)}.items():
        eg_decode_case(folder, label, b, count, 3 if label != "long-prefix" else 0, True)
    eg_decode_case(folder, "host-unsigned-k0", reference.eg_encode(s.abs(), 0, False), 5000, 0, False)

    streams = {"g1": gaussian_symbols(3000, 1.0), "g10": gaussian_symbols(20_000, 10.0),
               "many-rare": gaussian_symbols(3000, 300.0),
               "dominant": torch.cat([torch.zeros(4000, dtype=torch.int32), gaussian_symbols(100, 30.0)]),
               "raw": torch.randint(-1000, 1000, (60,), dtype=torch.int32), "extremes": extremes.repeat(3),
               "empty": torch.zeros(0, dtype=torch.int32), "one-symbol": torch.full((50,), 7, dtype=torch.int32),
               "wide-alphabet": torch.randperm(33_000, dtype=torch.int32).repeat(2)}
    for label, symbols in streams.items():
        rans_encode_case(folder, label, symbols)
    buf = reference.rans_encode(streams["g10"][:5000])
    bad_header = buf.clone()
    bad_header[3] = 30  # scale_bits (after mode and the 2-byte count): above 23
    last_state = buf.clone()
    last_state[-1] ^= 1
    for label, (b, count) in {"host": (buf, 5000), "host-raw": (reference.rans_encode(streams["raw"]), 60),
                              "truncated": (buf[:-1], 5000), "padded": (torch.cat([buf, buf[:1]]), 5000),
                              "miscounted": (buf, 5001), "bad-header": (bad_header, 5000),
                              "last-byte": (last_state, 5000)}.items():
        rans_decode_case(folder, label, b, count)


# ---- the chunked tensor codec (csrc/core/slim_codec.h) ----
# Payloads written on the host by the reference's chunking, table and quantization around the plain-Python coders.

SLIM_STEP = 0.002
SLIM_CODER_CODES = {"eg": 0.0, "eg-signed": 1.0, "rans": 2.0}
# csrc/core/float_format.h's FloatFormat codes.
FORMAT_CODES = {torch.float32: 0.0, torch.float64: 1.0, torch.bfloat16: 2.0, torch.float16: 3.0}


def slim_weights(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 0.02²) weights in dtype, flat (σ = 10 steps, as BackSlash quantizes them)."""
    return (torch.randn(numel, dtype=torch.float64) * 0.02).to(dtype)


def slim_encode_case(folder: Path, label: str, x: torch.Tensor, coder: str, chunk_numel: int,
                     step: float = SLIM_STEP) -> None:
    """Payload and layout, and x decoded from them (q·step rounded once to x's dtype); bad_value where the
    reference refuses an element."""
    encoded, status = refused(
        lambda: reference.slim_encode(x, step, coder, chunk_numel, coder_backend="reference"), "bad_value")
    arrays = {"x": x, "step": step, "coder": SLIM_CODER_CODES[coder], "chunk_numel": float(chunk_numel),
              **exact("status", STATUS[status])}
    if encoded is not None:
        arrays |= {**exact("payload", encoded[0]), **exact("layout", encoded[1]),
                   **exact("x", coding.dequantize(coding.quantize(x, step), step, x.dtype))}
    write_case(folder / f"slim_encode-{label}.case", "slim_encode", arrays)


def slim_decode_case(folder: Path, label: str, payload: torch.Tensor, layout: torch.Tensor, numel: int, coder: str,
                     chunk_numel: int, dtype: torch.dtype, expected: torch.Tensor | None,
                     step: float = SLIM_STEP) -> None:
    """expected: the decoded values, or None for a payload the core must refuse (corrupt_stream)."""
    write_case(folder / f"slim_decode-{label}.case", "slim_decode", {
        "payload": payload, "layout": layout, "numel": float(numel), "step": step,
        "coder": SLIM_CODER_CODES[coder], "chunk_numel": float(chunk_numel), "format": FORMAT_CODES[dtype],
        **exact("status", STATUS["ok" if expected is not None else "corrupt_stream"]),
        **({} if expected is None else exact("x", expected))})


def with_entries(layout: torch.Tensor, entries: dict[int, int]) -> torch.Tensor:
    out = layout.clone()
    for i, v in entries.items():
        out[i] = v
    return out


def slim_cases(folder: Path) -> None:
    """Every coder on float32, bfloat16, float16 and float64 in 7 chunks (the last one partial); one symbol per
    chunk, a chunk larger than the tensor, the default chunk, empty and one-element tensors; a chunk over the
    decoder's 2^16-symbol block; values without a symbol and one whose q·step overflows float16; decoding host
    payloads, and corrupt ones: a truncated chunk, a bad rANS header, a rANS count other than the chunk's, a
    truncated eg table, a rank outside the table, a q·step that overflows the output dtype."""
    for coder in SLIM_CODER_CODES:
        for name, dtype in FLOAT_DTYPES.items():
            slim_encode_case(folder, f"{coder}-{name}-615-by-100", slim_weights(615, dtype), coder, 100)
        x = slim_weights(40, torch.bfloat16)
        for chunk_numel in (1, 1000, coding.DEFAULT_CHUNK_NUMEL):
            slim_encode_case(folder, f"{coder}-bf16-40-by-{chunk_numel}", x, coder, chunk_numel)
        slim_encode_case(folder, f"{coder}-empty", slim_weights(0, torch.float32), coder, 4)
        slim_encode_case(folder, f"{coder}-one", slim_weights(1, torch.float16), coder, 3)
    for coder in ("eg-signed", "rans"):
        slim_encode_case(folder, f"{coder}-f32-70000-one-chunk", slim_weights(70_000, torch.float32), coder, 70_000)
    nan = slim_weights(300, torch.float32)
    nan[150] = float("nan")
    slim_encode_case(folder, "nan", nan, "eg", 64)
    slim_encode_case(folder, "f16-overflow", torch.tensor([1.0, 65504.0], dtype=torch.float16), "rans", 2, 2.0**15)

    x = slim_weights(615, torch.float32)
    want = coding.dequantize(coding.quantize(x, SLIM_STEP), SLIM_STEP, torch.float32)
    payloads = {coder: reference.slim_encode(x, SLIM_STEP, coder, 100, coder_backend="reference")
                for coder in SLIM_CODER_CODES}
    for coder, (payload, layout) in payloads.items():
        slim_decode_case(folder, f"host-{coder}", payload, layout, 615, coder, 100, torch.float32, want)
    payload, layout = payloads["eg-signed"]
    end = int(layout[:4].sum())  # the end of chunk 1
    slim_decode_case(folder, "truncated-chunk", torch.cat([payload[:end - 1], payload[end:]]),
                     with_entries(layout, {3: int(layout[3]) - 1}), 615, "eg-signed", 100, torch.float32, None)
    payload, layout = payloads["rans"]
    bad_mode = payload.clone()
    bad_mode[int(layout[2])] = 2  # chunk 1's mode byte: only 0 and 1 exist
    slim_decode_case(folder, "rans-bad-header", bad_mode, layout, 615, "rans", 100, torch.float32, None)
    one_chunk = reference.slim_encode(x[:10], SLIM_STEP, "rans", 10, coder_backend="reference")
    slim_decode_case(folder, "rans-miscounted", *one_chunk, 9, "rans", 9, torch.float32, None)
    payload, layout = payloads["eg"]
    table_count, table_nbytes = layout[:2].tolist()
    slim_decode_case(folder, "eg-truncated-table", torch.cat([payload[:table_nbytes - 1], payload[table_nbytes:]]),
                     with_entries(layout, {1: table_nbytes - 1}), 615, "eg", 100, torch.float32, None)
    table = reference.eg_decode(payload[:table_nbytes], table_count, 0, True)
    short = reference.eg_encode(table[:-1], 0, True)  # the rarest symbol dropped: some chunk still uses its rank
    slim_decode_case(folder, "eg-rank-outside-table", torch.cat([short, payload[table_nbytes:]]),
                     with_entries(layout, {0: table_count - 1, 1: short.numel()}), 615, "eg", 100, torch.float32,
                     None)
    big = reference.slim_encode(torch.tensor([65536.0, 0.0]), 2.0**15, "eg-signed", 2, coder_backend="reference")
    slim_decode_case(folder, "f16-overflow", *big, 2, "eg-signed", 2, torch.float16, None, 2.0**15)
    slim_decode_case(folder, "f32-no-overflow", *big, 2, "eg-signed", 2, torch.float32,
                     torch.tensor([65536.0, 0.0]), 2.0**15)

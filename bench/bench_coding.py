"""Entropy coders on quantized weights, beside the general-purpose compressors users reach for.

Input: 4 Mi weights θ ~ N(0, 0.02²) (builders.PARAM_STD) quantized with step 0.002 to int32 symbols
(σ = 10 symbols; coders as in docs/backslash.md §6).  Rows (groups "coding-encode-4M",
"coding-decode-4M"), all on the same int32 symbol bytes:
- eg0:  slimrate.ops.eg_encode/eg_decode, exp-Golomb order 0 (the paper's code), C++;
- egk:  the same at the order k with the fewest bits for this stream (chosen with eg_code_length);
- rans: slimrate.ops.rans_encode/rans_decode, static rANS with its frequency table in the buffer;
- zlib-6, lzma-6: Python's zlib (level 6) and lzma (preset 6) on the symbols' raw bytes;
- zstd-3, zstd-19: the `zstandard` package when installed (skipped with the reason otherwise).
extra_info: bytes (= 4·n, so GB/s is symbol throughput), compressed size in bits/symbol, the
empirical entropy H (the bound of any symbol-by-symbol code) and the rANS table cost separately.
Every coder's round trip is checked before it is timed.

Whole tensors (groups "slim-encode-<shape>-bf16-<coder>", "slim-decode-..."): a bfloat16 weight θ ~ N(0, 0.02²) of
a Llama-7B projection's shape (4096×4096, 11008×4096) → its .slim payload at Δ = 0.002 and back, coder eg or rans:
- native:    ops.slim_encode / slim_decode, C++: quantize + check + count fused, 2^20-symbol chunks in parallel;
- reference: the same ops on backend="reference" (ops.quantize, the table in PyTorch, the coders per chunk);
- v1:        what .slim version 1 ran: the reference with one chunk per tensor (one stream, float64 copies,
             torch.unique for eg).
extra_info: bytes = 2·numel (so GB/s is bfloat16 throughput), bits/param, and for native the payload's growth
over one chunk (chunk_overhead_pct).  Every row's decode is checked to equal native's before it is timed.
"""

from __future__ import annotations

import importlib.util
import lzma
import zlib
from collections.abc import Callable

import pytest
import torch
from builders import PARAM_STD

from slimrate import ops
from slimrate.backslash.metrics import symbol_entropy_bits
from slimrate.ops.coding import DEFAULT_CHUNK_NUMEL

N_SYMBOLS = 4 << 20
SIZE = "4M"
STEP = 0.002
EG_ORDERS = range(9)  # σ = 10 symbols: the best order is near log2 σ
# lzma preset 6 takes ~15 s per 16 MB on this 2-core machine: one round; the C++ coders take ~30 ms.
ROUNDS = {"lzma-6": 1, "zlib-6": 3, "zstd-19": 1}
DEFAULT_ROUNDS = 10
HAS_ZSTD = importlib.util.find_spec("zstandard") is not None


class Stream:
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        weights = torch.randn(N_SYMBOLS, generator=gen) * PARAM_STD
        self.symbols = ops.quantize(weights, STEP)
        self.raw = self.symbols.numpy().tobytes()
        self.entropy = symbol_entropy_bits(self.symbols)
        self.best_k = min(EG_ORDERS, key=lambda k: ops.eg_code_length(self.symbols, k))


@pytest.fixture(scope="module")
def stream() -> Stream:
    return Stream()


def _zstd(level: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    import zstandard

    return zstandard.ZstdCompressor(level=level).compress, zstandard.ZstdDecompressor().decompress


def coders(st: Stream) -> dict[str, tuple[Callable[[], object], Callable[[object], object]]]:
    """backend → (encode(), decode(encoded)), each decode returning something comparable to the input."""
    n, k = st.symbols.numel(), st.best_k
    out = {
        "eg0": (lambda: ops.eg_encode(st.symbols, 0), lambda b: ops.eg_decode(b, n, 0)),
        "egk": (lambda: ops.eg_encode(st.symbols, k), lambda b: ops.eg_decode(b, n, k)),
        "rans": (lambda: ops.rans_encode(st.symbols), lambda b: ops.rans_decode(b, n)),
        "zlib-6": (lambda: zlib.compress(st.raw, 6), zlib.decompress),
        "lzma-6": (lambda: lzma.compress(st.raw, preset=6), lzma.decompress),
    }
    if HAS_ZSTD:
        for level in (3, 19):
            compress, decompress = _zstd(level)
            out[f"zstd-{level}"] = (lambda c=compress: c(st.raw), decompress)
    return out


BACKENDS = ["eg0", "egk", "rans", "zlib-6", "lzma-6", "zstd-3", "zstd-19"]


def encoded_size(encoded: object) -> int:
    return len(encoded) if isinstance(encoded, bytes) else encoded.numel()


def checked(st: Stream, backend: str) -> tuple[Callable[[], object], Callable[[object], object], object]:
    if backend.startswith("zstd") and not HAS_ZSTD:
        pytest.skip("zstandard is not installed (pip install zstandard to add the zstd rows)")
    encode, decode = coders(st)[backend]
    encoded = encode()
    decoded = decode(encoded)
    same = decoded == st.raw if isinstance(decoded, bytes) else torch.equal(decoded, st.symbols)
    if not same:
        raise AssertionError(f"{backend}: the round trip does not reproduce the {st.symbols.numel()} symbols")
    return encode, decode, encoded


def set_info(benchmark, st: Stream, op: str, backend: str, encoded: object) -> None:
    benchmark.group = f"coding-{op}-{SIZE}"
    n = st.symbols.numel()
    size = encoded_size(encoded)
    benchmark.extra_info.update(op=op, backend=backend, dtype="int32", device="cpu", size=SIZE, symbols=n,
                                bytes=4 * n, step=STEP, param_std=PARAM_STD, compressed_bytes=size,
                                bits_per_symbol=8 * size / n, entropy_bits_per_symbol=st.entropy)
    if backend == "egk":
        benchmark.extra_info["k"] = st.best_k
    if backend == "rans":
        header = ops.rans_header_size(encoded)
        benchmark.extra_info.update(header_bytes=header, payload_bits_per_symbol=8 * (size - header) / n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode(benchmark, backend: str, stream: Stream):
    encode, _, encoded = checked(stream, backend)
    set_info(benchmark, stream, "encode", backend, encoded)
    benchmark.pedantic(encode, rounds=ROUNDS.get(backend, DEFAULT_ROUNDS), warmup_rounds=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode(benchmark, backend: str, stream: Stream):
    _, decode, encoded = checked(stream, backend)
    set_info(benchmark, stream, "decode", backend, encoded)
    benchmark.pedantic(decode, args=(encoded,), rounds=ROUNDS.get(backend, DEFAULT_ROUNDS) * 3, warmup_rounds=0)


# ---- whole tensors: the .slim payload of a bfloat16 weight ----------------------------------------------------

SLIM_SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}  # Llama-7B attention and MLP projections
SLIM_CODERS = ["eg", "rans"]
SLIM_BACKENDS = ["native", "reference", "v1"]
SLIM_ROUNDS = {"native": 5, "reference": 2, "v1": 2}  # v1 eg spends ~10 s per 11008×4096 encode here
_WEIGHTS: dict[str, torch.Tensor] = {}


def slim_weight(shape: str) -> torch.Tensor:
    if shape not in _WEIGHTS:
        gen = torch.Generator().manual_seed(1)
        _WEIGHTS[shape] = (torch.randn(SLIM_SHAPES[shape], generator=gen) * PARAM_STD).to(torch.bfloat16)
    return _WEIGHTS[shape]


def slim_paths(x: torch.Tensor, coder: str) -> dict[str, tuple[Callable[[], object], Callable[[object], object]]]:
    """backend → (encode(), decode(encoded) → flat bfloat16 tensor)."""
    n = x.numel()

    def ops_path(backend, chunk_numel=DEFAULT_CHUNK_NUMEL):
        return (lambda: ops.slim_encode(x, STEP, coder, chunk_numel, backend=backend),
                lambda e: ops.slim_decode(*e, n, STEP, coder, chunk_numel, x.dtype, backend=backend))

    return {"native": ops_path("native"), "reference": ops_path("reference"), "v1": ops_path("reference", n)}


def slim_checked(shape: str, coder: str, backend: str):
    x = slim_weight(shape)
    encode, decode = slim_paths(x, coder)[backend]
    encoded = encode()
    want = ops.slim_decode(*ops.slim_encode(x, STEP, coder), x.numel(), STEP, coder, DEFAULT_CHUNK_NUMEL, x.dtype)
    if not torch.equal(decode(encoded).view(torch.int16), want.view(torch.int16)):
        raise AssertionError(f"{backend} {coder}: the decoded {shape} weight differs from native's")
    return x, encode, decode, encoded


def slim_info(benchmark, op: str, shape: str, coder: str, backend: str, x: torch.Tensor, encoded) -> None:
    benchmark.group = f"slim-{op}-{shape}-bf16-{coder}"
    nbytes = encoded[0].numel()
    benchmark.extra_info.update(op=op, backend=backend, dtype="bfloat16", device="cpu", shape=shape, coder=coder,
                                bytes=2 * x.numel(), step=STEP, param_std=PARAM_STD, compressed_bytes=nbytes,
                                bits_per_param=8 * nbytes / x.numel())
    if backend == "native":
        single = ops.slim_encode(x, STEP, coder, x.numel())[0].numel()
        benchmark.extra_info.update(chunk_numel=DEFAULT_CHUNK_NUMEL,
                                    chunk_overhead_pct=100 * (nbytes - single) / single)


@pytest.mark.parametrize("backend", SLIM_BACKENDS)
@pytest.mark.parametrize("coder", SLIM_CODERS)
@pytest.mark.parametrize("shape", list(SLIM_SHAPES))
def test_slim_encode(benchmark, shape: str, coder: str, backend: str):
    x, encode, _, encoded = slim_checked(shape, coder, backend)
    slim_info(benchmark, "encode", shape, coder, backend, x, encoded)
    benchmark.pedantic(encode, rounds=SLIM_ROUNDS[backend], warmup_rounds=0)


@pytest.mark.parametrize("backend", SLIM_BACKENDS)
@pytest.mark.parametrize("coder", SLIM_CODERS)
@pytest.mark.parametrize("shape", list(SLIM_SHAPES))
def test_slim_decode(benchmark, shape: str, coder: str, backend: str):
    x, _, decode, encoded = slim_checked(shape, coder, backend)
    slim_info(benchmark, "decode", shape, coder, backend, x, encoded)
    benchmark.pedantic(decode, args=(encoded,), rounds=SLIM_ROUNDS[backend], warmup_rounds=0)

"""slim_encode / slim_decode: the chunked tensor codec behind .slim payloads (docs/slim-format.md).

Native bytes equal the reference's (ops.quantize + the frequency table + the coders per chunk) for every coder,
dtype and chunking; decoding gives ops.dequantize(ops.quantize(x)) bit for bit; one chunk is v1's payload; the
bytes do not depend on the thread count; bad values, arguments, layouts and payloads raise ValueError or
TypeError, and corrupted payloads never crash the decoder.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from slimrate import ops
from slimrate.ops.coding import DEFAULT_CHUNK_NUMEL, SLIM_CODERS

from helpers import DTYPE_IDS, env_with_this_slimrate, frequency_table, rans_buffer, skip_unless_backend, varint

STEP = 0.002
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (shape, chunk_numel): empty, one element, numel not a multiple of chunk_numel, one symbol per chunk,
# a chunk larger than the tensor, the default
CHUNKINGS = [((0,), 4), ((3, 0, 5), 1), ((), 3), ((1,), 1), ((5, 123), 100), ((5, 123), 1), ((7, 13), 1000),
             ((4, 129), DEFAULT_CHUNK_NUMEL)]
BACKENDS = ["native", "reference"]


@pytest.fixture(autouse=True)
def _native_built():
    skip_unless_backend("native", "cpu")  # the reference composes the native coders too


def weights(shape, dtype=torch.float32) -> torch.Tensor:
    """N(0, 0.02²) weights, as BackSlash quantizes them (σ = 10 steps)."""
    return (torch.randn(shape, dtype=torch.float64) * 0.02).to(dtype)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal dtype, shape and bits (so -0.0 differs from 0.0); names the first differing element."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    differ = got.view(ints) != want.view(ints)
    if bool(differ.any()):
        i = int(differ.nonzero()[0])
        raise AssertionError(f"element {i} of {got.numel()}: got {got[i].item()}, want {want[i].item()}")


def dequantized(x: torch.Tensor, step: float = STEP, dtype: torch.dtype | None = None) -> torch.Tensor:
    return ops.dequantize(ops.quantize(x, step), step, dtype or x.dtype).reshape(-1)


# ---- bytes and round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("shape,chunk_numel", CHUNKINGS, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("coder", SLIM_CODERS)
def test_native_bytes_match_reference_and_decode_exactly(coder, dtype, shape, chunk_numel):
    x = weights(shape, dtype)
    payload, layout = ops.slim_encode(x, STEP, coder, chunk_numel)
    want_payload, want_layout = ops.slim_encode(x, STEP, coder, chunk_numel, backend="reference")
    assert payload.dtype == torch.uint8 and layout.dtype == torch.int64
    assert torch.equal(layout, want_layout), f"layout {layout.tolist()} vs {want_layout.tolist()}"
    assert torch.equal(payload, want_payload), "payload bytes differ from the reference"
    assert layout.numel() == 2 + -(-x.numel() // chunk_numel) and int(layout[1:].sum()) == payload.numel()
    for backend in BACKENDS:
        out = ops.slim_decode(payload, layout, x.numel(), STEP, coder, chunk_numel, dtype, backend=backend)
        assert_same_bits(out, dequantized(x))


@pytest.mark.parametrize("coder", SLIM_CODERS)
def test_strided_input_codes_like_its_contiguous_copy(coder):
    base = weights((40, 60), torch.bfloat16)
    for view in (base.t(), base[::3, 1::2]):
        assert not view.is_contiguous()
        got = ops.slim_encode(view, STEP, coder, 97)
        for want in (ops.slim_encode(view.contiguous(), STEP, coder, 97),
                     ops.slim_encode(view, STEP, coder, 97, backend="reference")):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_quantization_rounds_half_to_even_like_ops_quantize():
    # x/step = k + 1/2 exactly (step = 1/8, x on the 1/16 grid, exact in every dtype): ties go to even
    x = torch.arange(-40, 41, dtype=torch.float64) / 16
    for dtype in DTYPES:
        payload, layout = ops.slim_encode(x.to(dtype), 0.125, "eg-signed", x.numel())  # one chunk
        q = ops.eg_decode(payload, x.numel(), 0, True)
        assert torch.equal(q, ops.quantize(x, 0.125).reshape(-1)), dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_decode_rounds_through_float32_like_torch(dtype):
    # q·step lies just above a tie of the 16-bit format but rounds onto it in float32: torch's float64 → 16-bit
    # conversion goes through float32 (ties to even then), so must the decoder.
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    step = 1 + ulp + 2.0**-40
    x = torch.tensor([step, -step, 3 * step, 0.0], dtype=torch.float64)
    payload, layout = ops.slim_encode(x, step, "rans", 2)
    out = ops.slim_decode(payload, layout, x.numel(), step, "rans", 2, dtype)
    assert_same_bits(out, ops.dequantize(ops.quantize(x, step), step, dtype))
    assert out[0].item() == 1.0  # direct rounding of float64 would give 1 + 2·ulp


def test_bytes_do_not_depend_on_the_thread_count():
    x = weights((70, 300), torch.bfloat16)  # 21 000 symbols in 21 chunks
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = [ops.slim_encode(x, STEP, coder, 1000) for coder in SLIM_CODERS]
            results[n] += [ops.slim_decode(*results[n][i], x.numel(), STEP, coder, 1000, x.dtype)
                           for i, coder in enumerate(SLIM_CODERS)]
    finally:
        torch.set_num_threads(threads)
    for single, multi in zip(results[1], results[2], strict=True):
        for a, b in zip(single if isinstance(single, tuple) else (single,),
                        multi if isinstance(multi, tuple) else (multi,), strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("coder", SLIM_CODERS)
def test_one_chunk_is_the_version_1_payload(coder):
    x = weights((9, 31), torch.bfloat16)
    q = ops.quantize(x, STEP).reshape(-1)  # version 1: one stream per tensor, the eg table before it
    if coder == "eg":
        table, ranks = frequency_table(q)
        table_bytes = ops.eg_encode(table, signed=True).numpy().tobytes()
        v1, table_count = table_bytes + ops.eg_encode(ranks, signed=False).numpy().tobytes(), table.numel()
    else:
        coded = ops.rans_encode(q) if coder == "rans" else ops.eg_encode(q, signed=True)
        v1, table_bytes, table_count = coded.numpy().tobytes(), b"", 0
    payload, layout = ops.slim_encode(x, STEP, coder, x.numel())
    assert payload.numpy().tobytes() == v1
    assert layout.tolist() == [table_count, len(table_bytes), len(v1) - len(table_bytes)]
    # and a v1 payload decodes through slim_decode with that layout
    v1_tensor = torch.frombuffer(bytearray(v1), dtype=torch.uint8)
    out = ops.slim_decode(v1_tensor, layout, x.numel(), STEP, coder, x.numel(), torch.bfloat16)
    assert_same_bits(out, dequantized(x))


def test_chunking_costs_little():
    x = weights((300, 1000), torch.bfloat16)
    for coder in SLIM_CODERS:
        single = ops.slim_encode(x, STEP, coder, x.numel())[0].numel()
        chunked = ops.slim_encode(x, STEP, coder, 30_000)[0].numel()
        # eg, eg-signed: at most a byte of padding per chunk; rans: each chunk's own table (~2 bytes/symbol)
        assert single <= chunked <= single * 1.02 + 10, coder


# ---- values without a symbol -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,match", [(float("nan"), "x: expected finite values, got nan at flat index 57"),
                                       (float("inf"), "x: expected finite values, got inf at flat index 57"),
                                       (-float("inf"), "got -inf at flat index 57"),
                                       (1e9, r"x/step: \|x\|/step = 5e\+11 at flat index 57 is not below 2\^31")])
@pytest.mark.parametrize("coder", SLIM_CODERS)
def test_encode_names_the_first_element_without_a_symbol(coder, bad, match, backend):
    x = weights((10, 20), torch.float32)
    x.view(-1)[57] = bad
    x.view(-1)[150] = float("nan")  # a later one, in a later chunk
    with pytest.raises(ValueError, match=match):
        ops.slim_encode(x.reshape(10, 20), STEP, coder, 16, backend=backend)


def test_encode_refuses_a_quotient_just_below_int32_max_plus_rounding():
    x = torch.tensor([0.0, 2.0**31 - 1.5, 2.0**31 - 1], dtype=torch.float64)
    with pytest.raises(ValueError, match="flat index 2"):
        ops.slim_encode(x, 1.0, "rans", 2)
    payload, layout = ops.slim_encode(x[:2], 1.0, "eg-signed", 1)  # 2^31 − 1.5 rounds to 2^31 − 2
    assert ops.slim_decode(payload, layout, 2, 1.0, "eg-signed", 1, torch.float64).tolist() == [0.0, 2.0**31 - 2]


# ---- values whose q·step overflows the dtype -------------------------------------------------------

def overflows(x: torch.Tensor, step: float) -> torch.Tensor:
    """Where round(x/step)·step, in float64 and rounded once to x's dtype as torch rounds it, is not finite."""
    return ~(torch.round(x.double() / step) * step).to(x.dtype).isfinite()


# (dtype, value, step): the largest finite value of each dtype with a step that rounds its q·step past it;
# float16 at step 48 gives q·step = 65520, the midpoint between 65504 and 2^16, which rounds to even: inf.
OVERFLOWING = [(torch.float16, 65504.0, 2.0**15), (torch.float16, 65504.0, 48.0),
               (torch.bfloat16, torch.finfo(torch.bfloat16).max, 2.0**127),
               (torch.float32, torch.finfo(torch.float32).max, 2.0**127),
               (torch.float64, torch.finfo(torch.float64).max, 2.0**1023)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coder", SLIM_CODERS)
@pytest.mark.parametrize("dtype,value,step", OVERFLOWING, ids=["fp16-step2^15", "fp16-step48", "bf16", "fp32", "fp64"])
def test_encode_refuses_values_whose_reconstruction_overflows(dtype, value, step, coder, backend):
    x = torch.tensor([0.0, 1.0, -2.0, value, 3.0, -value], dtype=dtype).reshape(2, 3)
    assert overflows(x, step).tolist() == [[False, False, False], [True, False, True]]
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"x: .* at flat index 3 quantizes to q = \d+ and q·step = .* overflows "
                                         rf"{name} \(step .*\); use a smaller step, or coder \"raw\""):
        ops.slim_encode(x, step, coder, 2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_encode_refuses_exactly_the_values_whose_reconstruction_overflows(dtype, backend):
    top = torch.finfo(dtype).max
    x = (torch.rand(400, dtype=torch.float64) * 0.06 + 0.94) * top * torch.sign(torch.randn(400))
    x = x.to(dtype)
    for step in (top / 3000, top / 1000.5, top / 200.3, top / 7.7, top / 2.5):
        bad = overflows(x, step)
        if bool(bad.any()):
            with pytest.raises(ValueError, match=f"at flat index {int(bad.nonzero()[0])} quantizes"):
                ops.slim_encode(x, step, "rans", 64, backend=backend)
        else:
            out = ops.slim_decode(*ops.slim_encode(x, step, "rans", 64, backend=backend), x.numel(), step, "rans", 64,
                                  dtype, backend=backend)
            assert_same_bits(out, (torch.round(x.double() / step) * step).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coder", SLIM_CODERS)
def test_decode_refuses_a_step_that_overflows_the_dtype(coder, backend):
    x = torch.tensor([1.0, 2.0, 0.0, -70000.0, 5.0], dtype=torch.float32)  # q = x at step 1
    payload, layout = ops.slim_encode(x, 1.0, coder, 2)
    with pytest.raises(ValueError, match=r"payload: chunk 1 of 3 \(bytes \[.*\)\): symbol 1: q = -70000 times step 1 "
                                         "overflows float16"):
        ops.slim_decode(payload, layout, x.numel(), 1.0, coder, 2, torch.float16, backend=backend)
    with pytest.raises(ValueError, match="chunk 0 of 3 .*symbol 1: q = 2 times step 2e\\+38 overflows float32"):
        ops.slim_decode(payload, layout, x.numel(), 2e38, coder, 2, torch.float32, backend=backend)


# ---- counts and headers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_refuses_a_count_below_the_streams(backend):
    # eg-signed q = [1, 0]: 011 1 and 4 bits of padding, so one symbol fits before what would be padding
    payload, layout = ops.slim_encode(torch.tensor([1.0, 0.0]), 1.0, "eg-signed", 2)
    assert payload.tolist() == [0b01110000]
    with pytest.raises(ValueError, match=r"payload: chunk 0 of 1 .*trailing bytes or non-zero padding bits"):
        ops.slim_decode(payload, layout, 1, 1.0, "eg-signed", 2, torch.float32, backend=backend)
    # eg q = [1, 0, 0]: the table [0, 1] is 1 011 (4 bits), the ranks [1, 0, 0] are 010 1 1 (5 bits)
    payload, layout = ops.slim_encode(torch.tensor([1.0, 0.0, 0.0]), 1.0, "eg", 3)
    assert layout.tolist() == [2, 1, 1] and payload.tolist() == [0b10110000, 0b01011000]
    with pytest.raises(ValueError, match=r"payload: chunk 0 of 1 .*trailing bytes or non-zero padding bits"):
        ops.slim_decode(payload, layout, 2, 1.0, "eg", 3, torch.float32, backend=backend)
    with pytest.raises(ValueError, match="payload: the eg table: .*trailing bytes or non-zero padding bits"):
        ops.slim_decode(payload, torch.tensor([1, 1, 1]), 3, 1.0, "eg", 3, torch.float32, backend=backend)


def rans_payload(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A "rans" payload and layout of one chunk."""
    return chunk, torch.tensor([0, 0, chunk.numel()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rans_headers_are_checked_before_the_output_is_allocated(backend):
    numel = 2**61  # 2^63 bytes of float32: only a refusal before the allocation passes
    head = bytes([0]) + varint(numel)
    s = weights(500).div(STEP).round().int().tolist()
    alphabet = sorted(set(s))
    freq = [s.count(a) for a in alphabet]
    freq[0] += 512 - len(s)  # 2^9 in all
    cases = {
        "truncated rANS buffer": torch.tensor(list(head), dtype=torch.uint8),
        "corrupt rANS header": torch.tensor(list(head + bytes([8, 2, 2, 0, 99, 99, 0, 0, 128, 0])), dtype=torch.uint8),
        "the rANS stream is too short for its count": rans_buffer(s, alphabet, freq, 9, count=numel),
    }
    for match, chunk in cases.items():
        with pytest.raises(ValueError, match=f"payload: chunk 0 of 1 .*{match}"):
            ops.slim_decode(*rans_payload(chunk), numel, STEP, "rans", numel, torch.float32, backend=backend)


def test_decode_refuses_a_numel_no_tensor_holds():
    # one repeated symbol: a valid rANS chunk of any count in a few bytes
    chunk = rans_buffer([0] * 3, [0], [1 << 16], 16, count=2**62)
    with pytest.raises(ValueError, match="numel: 4611686018427387904 elements of float32 exceed the largest tensor"):
        ops.slim_decode(*rans_payload(chunk), 2**62, STEP, "rans", 2**62, torch.float32)


DECODE_PEAK_SCRIPT = """import sys, torch
from slimrate import ops


def peak_kib():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


n, chunk = int(sys.argv[1]), torch.tensor([int(b) for b in sys.argv[2:]], dtype=torch.uint8)
before = peak_kib()
out = ops.slim_decode(chunk, torch.tensor([0, 0, chunk.numel()]), n, 0.01, "rans", n, torch.float32)
print((peak_kib() - before) // 1024)
assert not out.any()"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux's /proc")
def test_decode_costs_the_output_and_a_bounded_scratch():
    n = 1 << 24  # 64 MiB of float32 zeros from a 15-byte chunk; an int32 scratch of the chunk would double it
    chunk = ops.slim_encode(torch.zeros(16), 0.01, "rans", 16)[0]
    chunk = torch.cat([chunk[:1], torch.tensor(list(varint(n)), dtype=torch.uint8), chunk[2:]])
    done = subprocess.run([sys.executable, "-c", DECODE_PEAK_SCRIPT, str(n), *map(str, chunk.tolist())],
                          capture_output=True, text=True, env=env_with_this_slimrate(), timeout=300)
    assert done.returncode == 0, done.stderr
    growth_mib = int(done.stdout.split()[-1])
    assert growth_mib < 64 + 16, f"decoding 64 MiB grew the peak RSS by {growth_mib} MiB"


# ---- bad arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.ones(4, dtype=torch.int32)), TypeError, "x: expected float32"),
    (dict(x=[0.1, 0.2]), TypeError, "x: expected a torch.Tensor"),
    (dict(step=0.0), ValueError, "step: expected a value > 0"),
    (dict(step=float("nan")), ValueError, "step: expected a finite number"),
    (dict(coder="zstd"), ValueError, r"coder: expected one of \('eg', 'eg-signed', 'rans'\), got 'zstd'"),
    (dict(chunk_numel=0), ValueError, r"chunk_numel: expected an int in \[1, "),
    (dict(chunk_numel=2.0), TypeError, "chunk_numel: expected a Python int"),
])
def test_encode_rejects_bad_arguments(kwargs, error, match):
    args = dict(x=torch.ones(4), step=0.5, coder="eg", chunk_numel=2) | kwargs
    with pytest.raises(error, match=match):
        ops.slim_encode(args["x"], args["step"], args["coder"], args["chunk_numel"])


def encoded(coder="eg", shape=(6, 50), chunk_numel=64):
    x = weights(shape)
    payload, layout = ops.slim_encode(x, STEP, coder, chunk_numel)
    return x, payload, layout


def decode(payload, layout, numel=300, coder="eg", chunk_numel=64, dtype=torch.float32, backend=None):
    return ops.slim_decode(payload, layout, numel, STEP, coder, chunk_numel, dtype, backend=backend)


def test_decode_rejects_bad_arguments():
    _, payload, layout = encoded()
    with pytest.raises(TypeError, match="payload: expected uint8"):
        decode(payload.int(), layout)
    with pytest.raises(TypeError, match="layout: expected int64"):
        decode(payload, layout.int())
    for numel in (-1, 2**63):
        with pytest.raises(ValueError, match=r"numel: expected an int in \[0, 9223372036854775807\], got"):
            decode(payload, layout, numel=numel)
    with pytest.raises(TypeError, match="dtype: expected float32"):
        decode(payload, layout, dtype=torch.int32)
    with pytest.raises(ValueError, match="coder: expected one of"):
        decode(payload, layout, coder="EG")


def with_entry(layout: torch.Tensor, i: int, value: int) -> torch.Tensor:
    out = layout.clone()
    out[i] = value
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rejects_inconsistent_layouts(backend):
    _, payload, layout = encoded("eg")  # 300 symbols in chunks of 64: 5 chunks
    cases = {
        "layout: expected 2 \\+ 5 entries \\(numel 300 in chunks of 64\\), got 6": (payload, layout[:-1], {}),
        "layout: expected 2 \\+ 4 entries": (payload, layout, dict(numel=256)),
        "layout: expected 2 \\+ 3 entries": (payload, layout, dict(chunk_numel=100)),
        "layout: a table of 0 symbols": (payload, with_entry(layout, 0, 0), {}),
        "layout: a table of .* in -1 bytes": (payload, with_entry(layout, 1, -1), {}),
        "layout: a table of 10000 symbols": (payload, with_entry(layout, 0, 10_000), {}),
        "layout: chunk 1 of 5 claims -3 bytes": (payload, with_entry(layout, 3, -3), {}),
        "layout: chunk 4 of 5 claims 9223372036854775807 bytes": (payload, with_entry(layout, 6, 2**63 - 1), {}),
        "layout: chunk 2 of 5: 64 exp-Golomb codes cannot fit in 7 bytes": (payload, with_entry(layout, 4, 7), {}),
        "payload: .* bytes, but the layout accounts for": (torch.cat([payload, payload[:1]]), layout, {}),
    }
    for match, (p, lay, kwargs) in cases.items():
        with pytest.raises(ValueError, match=match):
            decode(p, lay, backend=backend, **kwargs)
    _, payload, layout = encoded("rans")
    with pytest.raises(ValueError, match="layout: coder rans has no table"):
        decode(payload, with_entry(layout, 1, 1), coder="rans", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coder", SLIM_CODERS)
def test_decode_rejects_truncated_and_padded_chunks(coder, backend):
    _, payload, layout = encoded(coder)
    ends = layout.cumsum(0)[1:]  # end of the table, then of each chunk
    cut = int(ends[2]) - 1  # the last byte of chunk 1
    short = torch.cat([payload[:cut], payload[cut + 1:]])
    with pytest.raises(ValueError, match=r"payload: chunk 1 of 5 \(bytes \["):
        decode(short, with_entry(layout, 3, int(layout[3]) - 1), coder=coder, backend=backend)
    if coder != "rans":  # a rANS buffer ends in its final state: a padded one fails the state check instead
        padded = torch.cat([payload[:cut + 1], torch.zeros(1, dtype=torch.uint8), payload[cut + 1:]])
        with pytest.raises(ValueError, match=r"payload: chunk 1 of 5 .*trailing bytes"):
            decode(padded, with_entry(layout, 3, int(layout[3]) + 1), coder=coder, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rejects_a_rank_outside_the_table(backend):
    x, payload, layout = encoded("eg")
    table_count, table_nbytes = layout[:2].tolist()
    table = ops.eg_decode(payload[:table_nbytes], table_count, 0, True)
    short = ops.eg_encode(table[:-1], 0, True)  # drop the rarest symbol, which some chunk uses
    bad_layout = torch.cat([torch.tensor([table_count - 1, short.numel()]), layout[2:]])
    with pytest.raises(ValueError, match=f"outside the table of {table_count - 1}"):
        decode(torch.cat([short, payload[table_nbytes:]]), bad_layout, backend=backend)
    with pytest.raises(ValueError, match="the eg table"):  # a table part longer than its codes
        decode(torch.cat([short, torch.zeros(1, dtype=torch.uint8), payload[table_nbytes:]]),
               torch.cat([torch.tensor([table_count - 1, short.numel() + 1]), layout[2:]]), backend="native")


def test_rans_counts_are_checked_before_the_output_is_allocated():
    _, payload, layout = encoded("rans", (1, 10), 10)
    with pytest.raises(ValueError, match="the rANS buffer holds 10 symbols, not 1000000000000"):
        torch.ops.slimrate.slim_decode(payload, layout, 10**12, STEP, "rans", 10**12, torch.float32)


def test_direct_op_calls_check_their_inputs():
    _, payload, layout = encoded()
    with pytest.raises(ValueError, match="chunk_numel"):
        torch.ops.slimrate.slim_decode(payload, layout, 300, STEP, "eg", 0, torch.float32)
    with pytest.raises(ValueError, match="step"):
        torch.ops.slimrate.slim_encode(torch.ones(3), -1.0, "eg", 4)
    with pytest.raises(ValueError, match="coder"):
        torch.ops.slimrate.slim_encode(torch.ones(3), 1.0, "lz4", 4)
    with pytest.raises(TypeError, match="x: expected float32"):
        torch.ops.slimrate.slim_encode(torch.ones(3, dtype=torch.int64), 1.0, "eg", 4)
    with pytest.raises(ValueError, match="cannot fit"):  # 10^12 EG codes in a few hundred bytes
        torch.ops.slimrate.slim_decode(payload, layout[:3], 10**12, STEP, "eg", 10**12, torch.float32)


@pytest.mark.parametrize("coder", SLIM_CODERS)
def test_random_corruption_raises_or_decodes_never_crashes(coder):
    x, payload, layout = encoded(coder, (4, 100), 90)  # 5 chunks, the last short
    gen = torch.Generator().manual_seed(7)
    outcomes = {"error": 0, "tensor": 0}
    for trial in range(120):
        bad_payload, bad_layout = payload.clone(), layout.clone()
        if trial % 4 == 3:  # an entry of the layout
            i = int(torch.randint(0, layout.numel(), (1,), generator=gen))
            bad_layout[i] += int(torch.randint(-3, 4, (1,), generator=gen))
        else:  # 1–3 bytes of the payload
            at = torch.randint(0, payload.numel(), (1 + trial % 3,), generator=gen)
            bad_payload[at] = torch.randint(0, 256, (at.numel(),), generator=gen).to(torch.uint8)
        try:
            out = decode(bad_payload, bad_layout, x.numel(), coder, 90)
        except ValueError:
            outcomes["error"] += 1
            continue
        outcomes["tensor"] += 1
        assert out.shape == (x.numel(),) and out.dtype == torch.float32
    assert outcomes["error"] > 0


# ---- registration ---------------------------------------------------------------------------------

def test_ops_pass_opcheck():
    x = weights((5, 40), torch.bfloat16)
    for coder in SLIM_CODERS:
        torch.library.opcheck(torch.ops.slimrate.slim_encode.default, (x, STEP, coder, 64))
        payload, layout = ops.slim_encode(x, STEP, coder, 64)
        torch.library.opcheck(torch.ops.slimrate.slim_decode.default,
                              (payload, layout, x.numel(), STEP, coder, 64, torch.bfloat16))


def test_fake_kernels_give_shapes_and_dtypes_without_data():
    x, payload, layout = encoded("rans", (6, 50), 64)
    with torch._subclasses.fake_tensor.FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake_payload, fake_layout = torch.ops.slimrate.slim_encode(mode.from_tensor(x), STEP, "rans", 64)
        assert fake_payload.dtype == torch.uint8 and fake_payload.dim() == 1
        assert fake_layout.shape == (2 + 5,) and fake_layout.dtype == torch.int64
        out = torch.ops.slimrate.slim_decode(mode.from_tensor(payload), mode.from_tensor(layout), 300, STEP, "rans",
                                             64, torch.float16)
        assert out.shape == (300,) and out.dtype == torch.float16

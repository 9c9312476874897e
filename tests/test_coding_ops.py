"""quantize/dequantize, exp-Golomb and rANS coders: bit-exact against ops/reference.py, lossless
round trips on random and adversarial streams, rate against the empirical entropy, bad inputs."""

import math

import pytest
import torch

from slimrate import ops
from slimrate.backslash.metrics import symbol_entropy_bits
from slimrate.ops import reference

from helpers import rans_buffer, skip_unless_backend, varint

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EG_ORDERS = [0, 1, 3, 7, 31]


def gaussian_symbols(n: int, sigma: float) -> torch.Tensor:
    """Rounded N(0, σ²) symbols: the quantized weights the coders are made for."""
    return torch.round(torch.randn(n, dtype=torch.float64) * sigma).to(torch.int32)


def adversarial_streams() -> dict[str, torch.Tensor]:
    """Edge cases: empty, one symbol, constant runs, int32 extremes, alternating huge magnitudes."""
    i32 = torch.int32
    return {
        "empty": torch.zeros(0, dtype=i32),
        "single": torch.tensor([7], dtype=i32),
        "zeros": torch.zeros(1000, dtype=i32),
        "extremes": torch.tensor([INT32_MAX, -INT32_MAX, 0, INT32_MAX, -1, 1, -INT32_MAX], dtype=i32),
        "long-run": torch.cat([torch.full((5000,), -3, dtype=i32), torch.tensor([INT32_MAX], dtype=i32),
                               torch.full((3000,), 12, dtype=i32)]),
        "random-int32": torch.randint(-INT32_MAX, INT32_MAX, (2000,), dtype=torch.int64).to(i32),
        "gaussian": gaussian_symbols(3000, 5.0),
    }


def nonneg(stream: torch.Tensor) -> torch.Tensor:
    """The stream made valid for signed=False (INT32_MIN never occurs in these streams)."""
    return stream.abs()


def assert_equal_symbols(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.int32 and got.shape == want.shape
    if not torch.equal(got, want):
        i = int((got != want).nonzero()[0])
        raise AssertionError(f"symbol {i} of {want.numel()}: got {int(got[i])}, want {int(want[i])}")


# ---- quantize / dequantize ------------------------------------------------------------------------

def test_quantize_rounds_half_to_even_and_dequantize_scales():
    x = torch.tensor([0.25, -0.25, 0.75, 1.0, -1.26, 0.0], dtype=torch.float32)
    q = ops.quantize(x, 0.5)
    assert q.dtype == torch.int32 and q.tolist() == [0, 0, 2, 2, -3, 0]
    assert torch.equal(ops.dequantize(q, 0.5), torch.tensor([0.0, 0.0, 1.0, 1.0, -1.5, 0.0]))
    w = torch.randn(5, 123) * 0.02
    assert torch.equal(ops.quantize(w, 0.002), torch.round(w.double() / 0.002).int())
    assert (ops.dequantize(ops.quantize(w, 0.002), 0.002) - w).abs().max() <= 0.001 + 1e-9


@pytest.mark.parametrize("x,match", [(torch.tensor([1.0, float("nan")]), "x: expected finite"),
                                     (torch.tensor([float("inf")]), "x: expected finite"),
                                     (torch.tensor([2.0**31]), "x/step")])
def test_quantize_rejects_values_without_a_symbol(x, match):
    with pytest.raises(ValueError, match=match):
        ops.quantize(x, 1.0)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="x: expected a float"):
        ops.quantize(torch.ones(3, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="step"):
        ops.quantize(torch.ones(3), 0.0)
    with pytest.raises(TypeError, match="q: expected int32"):
        ops.dequantize(torch.ones(3), 1.0)


# ---- exp-Golomb ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("k", EG_ORDERS)
def test_eg_encode_matches_reference_bit_exactly(k, signed):
    skip_unless_backend("native", "cpu")
    for name, stream in {**adversarial_streams(), "small": gaussian_symbols(777, 3.0)}.items():
        if stream.numel() > 3000:
            continue  # the Python reference is slow
        s = stream if signed else nonneg(stream)
        want = reference.eg_encode(s, k, signed)
        got = ops.eg_encode(s, k, signed)
        assert got.dtype == torch.uint8 and torch.equal(got, want), f"{name}: bytes differ from the reference"
        bits = ops.eg_code_length(s, k, signed)
        assert bits == reference.eg_code_length(s, k, signed) and got.numel() == math.ceil(bits / 8), name
        assert_equal_symbols(reference.eg_decode(got, s.numel(), k, signed), s)
        assert_equal_symbols(ops.eg_decode(want, s.numel(), k, signed), s)


def test_eg_code_lengths_follow_the_standard_definition():
    # EG0: 0 → "1", 1 → "010", 2 → "011", 3 → "00100" (docs/slim-format.md §6)
    s = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    assert ops.eg_encode(s, 0, False).tolist() == [0b10100110, 0b01000000]
    assert ops.eg_code_length(torch.tensor([0, -1, 1], dtype=torch.int32), 0, True) == 1 + 3 + 3


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("k", EG_ORDERS)
@pytest.mark.parametrize("name", list(adversarial_streams()))
def test_eg_round_trip_is_exact(name, k, signed):
    skip_unless_backend("native", "cpu")
    stream = adversarial_streams()[name]
    s = stream if signed else nonneg(stream)
    buf = ops.eg_encode(s, k, signed)
    assert buf.numel() == math.ceil(ops.eg_code_length(s, k, signed) / 8)
    assert_equal_symbols(ops.eg_decode(buf, s.numel(), k, signed), s)


def test_eg_encode_is_independent_of_the_thread_count():
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols((1 << 20) + 12345, 20.0)  # 17 chunks of 64 Ki, most starting mid-byte
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.eg_encode(s, 2, True)
    finally:
        torch.set_num_threads(threads)
    multi = ops.eg_encode(s, 2, True)
    assert torch.equal(single, multi)
    assert multi.numel() == math.ceil(ops.eg_code_length(s, 2, True) / 8)
    assert_equal_symbols(ops.eg_decode(multi, s.numel(), 2, True), s)


def test_eg_reference_backend_is_the_reference():
    s = gaussian_symbols(200, 4.0)
    assert torch.equal(ops.eg_encode(s, 1, backend="reference"), reference.eg_encode(s, 1))
    assert ops.eg_code_length(s, backend="reference") == reference.eg_code_length(s)


def test_eg_decode_raises_on_every_truncation():
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols(300, 30.0)
    buf = ops.eg_encode(s, 0, True)
    for cut in range(buf.numel()):
        with pytest.raises(ValueError, match="buf"):
            ops.eg_decode(buf[:cut].clone(), s.numel(), 0, True)


def test_eg_decode_rejects_corrupt_streams():
    skip_unless_backend("native", "cpu")
    with pytest.raises(ValueError, match="more than 32 zeros"):
        ops.eg_decode(torch.zeros(16, dtype=torch.uint8), 1)
    # unsigned: u = 2^31 (the 32-bit code 1 followed by 31 zeros, after 31 zeros) is not an int32
    big = reference.eg_encode(torch.tensor([INT32_MAX], dtype=torch.int32), 0, True)  # u = 2^32 − 2
    with pytest.raises(ValueError, match="not an int32 symbol"):
        ops.eg_decode(big, 1, 0, False)


def assert_byte_flips_never_crash(decode, buf, count, flips_per_try, tries, seed):
    """``decode(bad)`` of ``buf`` with ``flips_per_try`` random bytes replaced, ``tries`` times (seeded):
    each call raises ValueError or returns ``count`` symbols, never anything else."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        bad = buf.clone()
        at = torch.randint(0, bad.numel(), (flips_per_try,), generator=gen)
        bad[at] = torch.randint(0, 256, (flips_per_try,), generator=gen, dtype=torch.int64).to(torch.uint8)
        try:
            out = decode(bad)
        except ValueError:
            continue
        assert out.shape == (count,)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_eg_decode_refuses_a_count_below_the_streams(backend):
    skip_unless_backend(backend, "cpu")
    # EG0 of [3, 0, 0] is 00100 1 1 + one bit of padding: the last code lies where padding would be for count 2
    buf = ops.eg_encode(torch.tensor([3, 0, 0], dtype=torch.int32), 0, False)
    assert buf.tolist() == [0b00100110]
    with pytest.raises(ValueError, match="buf: trailing bytes or non-zero padding bits after the last code"):
        ops.eg_decode(buf, 2, 0, False, backend=backend)
    for k in (0, 3):
        s = gaussian_symbols(300, 20.0)
        buf = ops.eg_encode(s, k, True)
        for count in (s.numel() - 1, 0):
            with pytest.raises(ValueError, match="buf: trailing bytes or non-zero padding"):
                ops.eg_decode(buf, count, k, True, backend=backend)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_eg_decode_refuses_trailing_bytes_and_padding_bits(backend):
    skip_unless_backend(backend, "cpu")
    s = torch.tensor([5, -2, 0, 7], dtype=torch.int32)
    buf = ops.eg_encode(s, 1, True)
    padding = 8 * buf.numel() - ops.eg_code_length(s, 1, True)
    assert padding == 4
    assert_equal_symbols(ops.eg_decode(buf, s.numel(), 1, True, backend=backend), s)
    padded = [torch.cat([buf, torch.zeros(1, dtype=torch.uint8)]), torch.cat([buf, buf[:1]])]
    for bit in range(padding):  # each padding bit set
        dirty = buf.clone()
        dirty[-1] |= 1 << bit
        padded.append(dirty)
    for bad in padded:
        with pytest.raises(ValueError, match="buf: trailing bytes or non-zero padding bits"):
            ops.eg_decode(bad, s.numel(), 1, True, backend=backend)


def test_eg_decode_survives_random_byte_flips():
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols(500, 10.0)
    assert_byte_flips_never_crash(lambda bad: ops.eg_decode(bad, s.numel(), 1, True), ops.eg_encode(s, 1, True),
                                  s.numel(), flips_per_try=3, tries=2000, seed=1)


# ---- rANS -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(adversarial_streams()))
def test_rans_round_trip_is_exact(name):
    skip_unless_backend("native", "cpu")
    s = adversarial_streams()[name]
    assert_equal_symbols(ops.rans_decode(ops.rans_encode(s), s.numel()), s)


def rans_streams() -> dict[str, torch.Tensor]:
    """The adversarial streams, then tables whose rounded frequencies the encoder must trim (many rare symbols)
    or top up (one dominant symbol), a mode-1 (raw) stream and an alphabet over 2^15 symbols (scale_bits 17)."""
    return {**adversarial_streams(), "many-rare": gaussian_symbols(3000, 300.0),
            "dominant": torch.cat([torch.zeros(4000, dtype=torch.int32), gaussian_symbols(100, 30.0)]),
            "raw": torch.randint(-1000, 1000, (60,), dtype=torch.int32),
            "wide-alphabet": torch.randperm(33000, dtype=torch.int32).repeat(2)}


@pytest.mark.parametrize("name", list(rans_streams()))
def test_rans_encode_matches_reference_bit_exactly(name):
    skip_unless_backend("native", "cpu")
    s = rans_streams()[name]
    want = reference.rans_encode(s)
    assert torch.equal(ops.rans_encode(s), want), "bytes differ from the reference"
    assert_equal_symbols(reference.rans_decode(want, s.numel()), s)
    assert_equal_symbols(ops.rans_decode(want, s.numel()), s)


def test_rans_reference_decode_refuses_truncated_padded_and_miscounted_buffers():
    s = gaussian_symbols(300, 4.0)
    buf = reference.rans_encode(s)
    for bad, count, match in [(buf[:-1], 300, "truncated rANS buffer"), (buf[:5], 300, "truncated rANS buffer"),
                              (torch.cat([buf, buf[:1]]), 300, "trailing bytes"),
                              (buf, 301, "count: the buffer holds 300 symbols, got count=301")]:
        with pytest.raises(ValueError, match=match):
            ops.rans_decode(bad, count, backend="reference")


@pytest.mark.parametrize("sigma", [1.0, 8.0, 50.0])
def test_rans_rate_is_within_one_percent_of_entropy(sigma):
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols(200_000, sigma)
    buf = ops.rans_encode(s)
    assert_equal_symbols(ops.rans_decode(buf, s.numel()), s)
    bound = s.numel() * symbol_entropy_bits(s)
    # the payload is judged; the table (a few bytes per distinct symbol) is reported separately
    header = ops.rans_header_size(buf)
    assert 0 < header < 4 * torch.unique(s).numel() + 16
    payload_bits = 8 * (buf.numel() - header)
    assert payload_bits <= 1.01 * bound, f"{payload_bits / s.numel():.4f} bits/symbol vs H = {bound / s.numel():.4f}"


def test_rans_decode_raises_on_every_truncation():
    skip_unless_backend("native", "cpu")
    for s in (gaussian_symbols(400, 6.0), torch.zeros(50, dtype=torch.int32),
              torch.randint(-100, 100, (40,), dtype=torch.int32)):
        buf = ops.rans_encode(s)
        for cut in range(buf.numel()):
            with pytest.raises(ValueError):
                ops.rans_decode(buf[:cut].clone(), s.numel())


def test_rans_decode_survives_random_byte_flips():
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols(500, 10.0)
    assert_byte_flips_never_crash(lambda bad: ops.rans_decode(bad, s.numel()), ops.rans_encode(s), s.numel(),
                                  flips_per_try=2, tries=3000, seed=2)


def count_bound_bits(freq: list[int], scale_bits: int) -> float:
    """λ of csrc/kernels/entropy_rans.h (rans_count_fits): every valid stream of n symbols after its state has
    B bytes with n·λ < 8·(B + 1)."""
    return scale_bits - math.log2(max(freq)) - math.log2(1 + 2.0 ** (scale_bits - 23))


def count_bound_runs(freq: list[int], scale_bits: int) -> int:
    """R + 1 of rans_count_fits: with ≥ 2 symbols, every valid stream of n symbols after its state has B bytes
    with n ≤ (B + 1)·(R + 1)."""
    return (2**31 - 1 - 2**23) // (2 ** (23 - scale_bits) * (2**scale_bits - max(freq))) + 1


def test_python_rans_buffers_decode():
    skip_unless_backend("native", "cpu")
    s = [3, -1, 3, 3, 8, -1, 3, 0] * 50
    buf = rans_buffer(s, [-1, 0, 3, 8], [9, 2, 17, 4], 5)
    assert_equal_symbols(ops.rans_decode(buf, len(s)), torch.tensor(s, dtype=torch.int32))
    assert torch.equal(ops.rans_encode(torch.zeros(7, dtype=torch.int32)), rans_buffer([0] * 7, [0], [1 << 16], 16))


# (scale_bits, largest frequency): the densest stream of a table repeats its most frequent symbol
DENSE_TABLES = [(1, 1), (4, 15), (8, 3), (12, 100), (16, 4000), (16, 65_535), (20, 5000), (23, 2**16), (23, 2**22)]


def table_with_largest(scale_bits: int, fmax: int) -> list[int]:
    """Frequencies summing to 2^scale_bits, the first fmax and none larger."""
    rest = (1 << scale_bits) - fmax
    k = -(-rest // fmax)
    return [fmax] + [rest // k + (i < rest % k) for i in range(k)]


@pytest.mark.parametrize("scale_bits,fmax", DENSE_TABLES)
def test_rans_count_bound_admits_the_densest_streams(scale_bits, fmax):
    skip_unless_backend("native", "cpu")
    freq = table_with_largest(scale_bits, fmax)
    assert sum(freq) == 1 << scale_bits and max(freq) == fmax
    alphabet = list(range(len(freq)))
    lam = count_bound_bits(freq, scale_bits)
    tightest = 0.0
    for n in (len(freq), 3 * len(freq), 2000):  # a table has no more symbols than the stream
        buf = rans_buffer([0] * n, alphabet, freq, scale_bits)
        assert_equal_symbols(ops.rans_decode(buf, n), torch.zeros(n, dtype=torch.int32))
        stream_bytes = buf.numel() - ops.rans_header_size(buf) - 4
        assert n * lam < 8 * (stream_bytes + 1)
        if len(freq) > 1:
            assert n <= (stream_bytes + 1) * count_bound_runs(freq, scale_bits)
        tightest = max(tightest, n * lam / (8 * (stream_bytes + 1)))
    if lam > 1:  # the bound is close to what the densest streams reach: it could not be much tighter
        assert tightest > 0.85, tightest


def test_rans_decode_refuses_a_count_the_stream_cannot_hold():
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols(1000, 10.0).tolist()
    alphabet = sorted(set(s))
    freq = [max(1, round(s.count(a) / len(s) * 4096)) for a in alphabet]
    freq[freq.index(max(freq))] += 4096 - sum(freq)
    buf = rans_buffer(s, alphabet, freq, 12)
    assert_equal_symbols(ops.rans_decode(buf, len(s)), torch.tensor(s, dtype=torch.int32))
    stream_bytes = buf.numel() - ops.rans_header_size(buf) - 4
    beyond = math.ceil((8 * (stream_bytes + 1) + 1) / count_bound_bits(freq, 12)) + 1
    for count in (beyond, 2**62):
        forged = rans_buffer(s, alphabet, freq, 12, count=count)
        with pytest.raises(ValueError, match="buf: the rANS stream is too short for its count"):
            ops.rans_decode(forged, count)


def test_rans_decode_bounds_the_count_of_a_skewed_two_symbol_table():
    """Frequencies 2^16 − 1 and 1: the bits bound says nothing (λ ≤ 0), the step bound still refuses 2^40."""
    skip_unless_backend("native", "cpu")
    s = [0] * 3000 + [1] + [0] * 50
    buf = rans_buffer(s, [0, 1], [2**16 - 1, 1], 16)
    assert_equal_symbols(ops.rans_decode(buf, len(s)), torch.tensor(s, dtype=torch.int32))
    assert count_bound_bits([2**16 - 1, 1], 16) <= 0
    stream_bytes = buf.numel() - ops.rans_header_size(buf) - 4
    beyond = (stream_bytes + 1) * count_bound_runs([2**16 - 1, 1], 16) + 1
    for count in (beyond, 2**40):
        with pytest.raises(ValueError, match="buf: the rANS stream is too short for its count"):
            ops.rans_decode(rans_buffer(s, [0, 1], [2**16 - 1, 1], 16, count=count), count)


@pytest.mark.parametrize("count", [2**40, 2**62])
def test_rans_decode_checks_the_whole_header_before_allocating(count):
    skip_unless_backend("native", "cpu")
    head = bytes([0]) + varint(count)
    cases = [
        ("truncated rANS buffer", head),  # 7 or 10 bytes: the count and nothing after it
        ("corrupt rANS header", bytes([7]) + varint(count) + bytes(8)),  # mode 7
        ("corrupt rANS header", head + bytes([8, 2, 2, 0, 99, 99])),  # frequencies summing to 200, not 2^8
        ("truncated rANS buffer", head + bytes([8, 2, 2, 0, 99, 155])),  # no state
        ("truncated rANS buffer", bytes([1]) + varint(count) + bytes(12)),  # raw: 3 symbols, not count
    ]
    for match, data in cases:
        with pytest.raises(ValueError, match=f"buf: {match}"):
            ops.rans_decode(torch.tensor(list(data), dtype=torch.uint8), count)
    with pytest.raises(ValueError, match="buf: corrupt rANS stream"):  # raw with a byte too many
        ops.rans_decode(torch.tensor([1, 2] + [0] * 9, dtype=torch.uint8), 2)


def test_rans_decode_refuses_a_count_no_tensor_holds():
    skip_unless_backend("native", "cpu")
    # one repeated symbol costs no stream bytes: the header may state any count, the tensor's size is the limit
    buf = rans_buffer([0] * 5, [0], [1 << 16], 16, count=2**62)
    with pytest.raises(ValueError, match="count: 4611686018427387904 int32 symbols exceed the largest tensor"):
        ops.rans_decode(buf, 2**62)


def test_rans_decode_rejects_a_wrong_count():
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols(100, 3.0)
    with pytest.raises(ValueError, match="count"):
        ops.rans_decode(ops.rans_encode(s), 99)


# ---- bad arguments --------------------------------------------------------------------------------

CODERS = {
    "eg_encode": lambda s: ops.eg_encode(s),
    "eg_code_length": lambda s: ops.eg_code_length(s),
    "rans_encode": lambda s: ops.rans_encode(s),
}


@pytest.mark.parametrize("coder", list(CODERS))
def test_encoders_reject_bad_symbols(coder):
    encode = CODERS[coder]
    with pytest.raises(TypeError, match="symbols: expected int32"):
        encode(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="symbols: expected a 1-D"):
        encode(torch.zeros(2, 3, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_eg_encode_rejects_symbols_without_a_code(backend):
    skip_unless_backend(backend, "cpu")
    with pytest.raises(ValueError, match="INT32_MIN"):
        ops.eg_encode(torch.tensor([1, INT32_MIN], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="signed=False"):
        ops.eg_code_length(torch.tensor([1, -2], dtype=torch.int32), signed=False, backend=backend)


def test_decoders_reject_bad_arguments():
    buf = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="buf: expected uint8"):
        ops.eg_decode(buf.int(), 1)
    with pytest.raises(ValueError, match="buf: expected a 1-D"):
        ops.rans_decode(buf.reshape(2, 2), 1)
    with pytest.raises(ValueError, match="count"):
        ops.eg_decode(buf, -1)
    with pytest.raises(ValueError, match="count"):
        ops.rans_decode(buf, -1)
    for decode in (ops.eg_decode, ops.rans_decode):  # beyond int64: the face refuses, not the schema
        with pytest.raises(ValueError, match=r"count: expected an int in \[0, 9223372036854775807\], got 922337"):
            decode(buf, 2**63)
    with pytest.raises(ValueError, match="k: expected"):
        ops.eg_decode(buf, 1, k=32)
    with pytest.raises(ValueError, match="eg_encode has no 'triton' backend"):
        ops.eg_encode(torch.zeros(3, dtype=torch.int32), backend="triton")


def test_direct_op_calls_check_their_inputs():
    skip_unless_backend("native", "cpu")
    with pytest.raises(TypeError, match="symbols"):
        torch.ops.slimrate.eg_encode(torch.zeros(3), 0, True)
    with pytest.raises(ValueError, match="count"):
        torch.ops.slimrate.eg_decode(torch.zeros(3, dtype=torch.uint8), -5, 0, True)
    with pytest.raises(ValueError, match="cannot hold"):
        torch.ops.slimrate.eg_decode(torch.zeros(3, dtype=torch.uint8), 10**12, 0, True)
    with pytest.raises(ValueError, match="k"):
        torch.ops.slimrate.eg_encode(torch.zeros(3, dtype=torch.int32), 40, True)


def test_coding_ops_pass_opcheck():
    skip_unless_backend("native", "cpu")
    s = gaussian_symbols(100, 20.0)
    cases = {
        "eg_code_length": (s, 2, True),
        "eg_encode": (s, 2, True),
        "eg_decode": (ops.eg_encode(s, 2), s.numel(), 2, True),
        "rans_encode": (s,),
        "rans_decode": (ops.rans_encode(s), s.numel()),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.slimrate, name).default, args)


def test_rans_decode_refuses_a_count_varint_past_64_bits():
    """A 10-byte varint whose last byte carries more than bit 63 would wrap (2^64 read as 0): refused."""
    skip_unless_backend("native", "cpu")
    empty = ops.rans_encode(torch.zeros(0, dtype=torch.int32)).tolist()  # mode, count 0, then the table
    wrapped = [empty[0]] + [0x80] * 9 + [0x02] + empty[2:]  # the count 2^64 ≡ 0 (mod 2^64)
    with pytest.raises(ValueError, match="buf: truncated rANS buffer"):
        ops.rans_decode(torch.tensor(wrapped, dtype=torch.uint8), 0)

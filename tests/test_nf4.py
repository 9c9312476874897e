"""nf4_quantize / nf4_dequantize against bitsandbytes itself: identical bytes, absmax, double-quantized
statistics and dequantized values, on random weights of many shapes (incl. sizes not divisible by the block
size), float32/bfloat16/float16, native and reference backends; fakes, opcheck, bad inputs.

bitsandbytes 0.50's CPU dequantize_4bit kernel (used for an even last dimension) reads absmax per row,
right only when the last dimension is a multiple of the block size: for W [48, 96] it disagrees with its own
quantizer, its portable and CUDA kernels.  slimrate follows the format (blocks over the flattened weight), and
the tests ask bitsandbytes for the flattened weight, which takes its correct path for every shape.
"""

import copy

import pytest
import torch

from slimrate import ops
from slimrate.ops import reference

from helpers import DTYPE_IDS, skip_unless_backend

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["native", "reference"]
# 1-D and 2-D, odd sizes, n not a multiple of the block, rows not a multiple of the block, one block exactly.
SHAPES = [(1,), (7,), (64,), (65,), (3, 5), (13, 127), (128, 33), (300, 257), (64, 64), (48, 96)]


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit of the flattened weight, reshaped (see the module docstring).  Its portable
    kernel (odd sizes) is wrapped in torch.compile; eager is the same arithmetic without seconds of compiling."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    with torch._dynamo.config.patch(disable=True):
        return bnbf.dequantize_4bit(packed, flat).reshape(state.shape)


def random_weight(shape, dtype):
    """N(0, 0.05²) weights with a few outliers, as LLM weights have."""
    w = torch.randn(shape) * 0.05
    flat = w.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 97),))] *= 8
    return w.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("shape", SHAPES[1::2], ids=str)
def test_nf4_quantize_matches_bitsandbytes_bytes(backend, dtype, blocksize, shape):
    skip_unless_backend(backend, "cpu")
    w = random_weight(shape, dtype)
    want, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    packed, absmax = ops.nf4_quantize(w, blocksize, backend=backend)
    assert packed.dtype == torch.uint8 and packed.shape == want.shape == ((w.numel() + 1) // 2, 1)
    mismatch = (packed != want).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} bytes differ, first at {mismatch[0].tolist()}"
    assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_dequantize_matches_bitsandbytes_values(backend, out_dtype, shape):
    skip_unless_backend(backend, "cpu")
    w = random_weight(shape, torch.float32)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    state.dtype = out_dtype
    want = bnb_dequantize(packed, state)
    got = ops.nf4_dequantize(packed, state.absmax, shape, 64, out_dtype, backend=backend)
    assert got.shape == shape and got.dtype == out_dtype
    assert torch.equal(got, want)
    assert torch.equal(ops.nf4_dequantize(packed, state, backend=backend), want)  # QuantState: its shape, dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(5,), (300, 257), (130, 128)], ids=str)  # 1, 1207, 260 absmax values
def test_nf4_double_quant_matches_bitsandbytes(backend, dtype, shape):
    skip_unless_backend(backend, "cpu")
    w = random_weight(shape, dtype)
    want_packed, want = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = ops.nf4_quantize(w, 64, compress_statistics=True, backend=backend)
    assert isinstance(state, bnbf.QuantState) and state.nested
    assert torch.equal(packed, want_packed)
    assert torch.equal(state.absmax, want.absmax) and state.absmax.dtype == torch.uint8
    assert torch.equal(state.offset, want.offset) and torch.equal(state.state2.absmax, want.state2.absmax)
    assert state == want  # bitsandbytes' own comparison: code tables, shape, dtype, blocksize, quant_type
    deq = bnb_dequantize(want_packed, want)
    assert torch.equal(ops.nf4_dequantize(packed, state, backend=backend), deq)
    assert torch.equal(bnb_dequantize(packed, state), deq)  # ours is a drop-in QuantState


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_nf4_nested_absmax_matches_bitsandbytes(backend):
    """code[qabsmax]·absmax2 + offset with bitsandbytes' two roundings, incl. a partial last block of 256."""
    skip_unless_backend(backend, "cpu")
    w = random_weight((300, 257), torch.float32)  # 1205 absmax values: 4 blocks of 256 and a partial one
    _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    with torch._dynamo.config.patch(disable=True):
        want = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    s2 = state.state2
    from slimrate.ops.backend import pick_backend

    got = pick_backend("nf4_absmax_dequantize", backend, w.device)(state.absmax, s2.code, s2.absmax, state.offset,
                                                                    s2.blocksize)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_quantize_ties_zero_blocks_and_padding_match_bitsandbytes(backend):
    """Values exactly on code midpoints (a block with absmax 1 scales by exactly 1), an all-zero block, a
    partial last block and an odd count (the padding nibble)."""
    skip_unless_backend(backend, "cpu")
    code = reference.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    tie_block = torch.cat([mids, -mids, torch.ones(1), torch.zeros(64 - 31)])
    w = torch.cat([tie_block, torch.zeros(64), torch.randn(37) * 0.1])  # 165 weights: odd, partial last block
    want, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, absmax = ops.nf4_quantize(w, 64, backend=backend)
    assert torch.equal(packed, want) and torch.equal(absmax, state.absmax)
    assert packed[-1].item() & 15 == 7  # the pad nibble is code 7 (0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,blocksize", [((7,), 64), ((13, 127), 32), ((48, 96), 64)], ids=str)
def test_nf4_triton_matches_bitsandbytes(dtype, shape, blocksize):
    """Triton kernels (the interpreter when there is no GPU, conftest.py: small shapes only)."""
    skip_unless_backend("triton", "cpu")
    w = random_weight(shape, dtype)
    want, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    packed, absmax = ops.nf4_quantize(w, blocksize, backend="triton")
    assert torch.equal(packed, want) and torch.equal(absmax, state.absmax)
    for out_dtype in DTYPES:
        state.dtype = out_dtype
        assert torch.equal(ops.nf4_dequantize(packed, absmax, shape, blocksize, out_dtype, backend="triton"),
                           bnb_dequantize(want, state))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_nf4_accepts_bitsandbytes_quant_storage(storage):
    """bnb_4bit_quant_storage (bfloat16 for FSDP): the same bytes in another dtype."""
    skip_unless_backend("native", "cpu")
    w = random_weight((16, 128), torch.float32)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", quant_storage=storage)
    assert packed.dtype == storage
    want = bnb_dequantize(packed, state)
    assert torch.equal(ops.nf4_dequantize(packed, state), want)
    x, lora_A, lora_B = torch.randn(2, 128), torch.randn(4, 128), torch.zeros(16, 4)
    torch.testing.assert_close(ops.nf4_lora_linear(x, packed, state, lora_A, lora_B, 1.0), x @ want.t())


def test_nf4_quantize_noncontiguous_and_empty():
    skip_unless_backend("native", "cpu")
    w = random_weight((40, 70), torch.bfloat16).t()
    assert not w.is_contiguous()
    want, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
    packed, absmax = ops.nf4_quantize(w)
    assert torch.equal(packed, want) and torch.equal(absmax, state.absmax)
    packed, absmax = ops.nf4_quantize(torch.empty(0, 8))
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    assert ops.nf4_dequantize(packed, absmax, (0, 8)).shape == (0, 8)


def test_nf4_round_trip_error_is_nf4s():
    """Relative reconstruction error of N(0, 1) weights ≈ 0.09 (bitsandbytes' own NF4 measured 0.092)."""
    skip_unless_backend("native", "cpu")
    w = torch.randn(256, 512)
    rel = ((ops.nf4_dequantize(*ops.nf4_quantize(w), w.shape) - w).norm() / w.norm()).item()
    assert 0.085 < rel < 0.1


def test_nf4_ops_pass_opcheck():
    skip_unless_backend("native", "cpu")
    w = random_weight((13, 70), torch.bfloat16)
    torch.library.opcheck(torch.ops.slimrate.nf4_quantize.default, (w, 64))
    packed, absmax = ops.nf4_quantize(w)
    torch.library.opcheck(torch.ops.slimrate.nf4_dequantize.default, (packed.view(-1), absmax, [13, 70], 64,
                                                                       torch.float16))
    _, state = ops.nf4_quantize(torch.randn(300, 257), compress_statistics=True)
    s2 = state.state2
    torch.library.opcheck(torch.ops.slimrate.nf4_absmax_dequantize.default,
                          (state.absmax, s2.code, s2.absmax, state.offset, s2.blocksize))


def test_nf4_quantize_rejects_bad_inputs():
    w = torch.randn(8, 64)
    with pytest.raises(TypeError, match="w"):
        ops.nf4_quantize(w.double())
    with pytest.raises(TypeError, match="w"):
        ops.nf4_quantize(w.numpy())
    with pytest.raises(ValueError, match="blocksize"):
        ops.nf4_quantize(w, 48)
    with pytest.raises(TypeError, match="blocksize"):
        ops.nf4_quantize(w, 64.0)


def test_nf4_dequantize_rejects_bad_inputs():
    packed, absmax = ops.nf4_quantize(torch.randn(8, 64), backend="reference")
    with pytest.raises(ValueError, match="packed"):
        ops.nf4_dequantize(packed[:-1], absmax, (8, 64))
    with pytest.raises(ValueError, match="absmax"):  # blocksize mismatch: 8 absmax values, blocks of 128 need 4
        ops.nf4_dequantize(packed, absmax, (8, 64), 128)
    with pytest.raises(TypeError, match="packed"):
        ops.nf4_dequantize(packed.bool(), absmax, (8, 64))
    with pytest.raises(ValueError, match="packed"):  # 4 bytes per element: not these weights' bytes
        ops.nf4_dequantize(packed.float(), absmax, (8, 64))
    with pytest.raises(TypeError, match="absmax_or_quant_state"):
        ops.nf4_dequantize(packed, [1.0], (8, 64))
    with pytest.raises(TypeError, match="dtype"):
        ops.nf4_dequantize(packed, absmax, (8, 64), dtype=torch.int32)
    _, state = bnbf.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    with pytest.raises(ValueError, match="blocksize"):
        ops.nf4_dequantize(packed, state, blocksize=128)
    with pytest.raises(ValueError, match="shape"):
        ops.nf4_dequantize(packed, state, shape=(64, 8))
    _, fp4 = bnbf.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        ops.nf4_dequantize(packed, fp4)


# A nested QuantState whose parts disagree: the face refuses it on every backend (the native glue would too;
# the reference would index the code out of range or read absmax2 short).
BAD_NESTED = {
    "qabsmax-float": (lambda st: setattr(st, "absmax", st.absmax.float()), TypeError, r"\.absmax:"),
    "code-short": (lambda st: setattr(st.state2, "code", st.state2.code[:16]), ValueError, r"\.state2\.code:"),
    "absmax2-extra": (lambda st: setattr(st.state2, "absmax", st.state2.absmax.repeat(2)), ValueError,
                      r"\.state2\.absmax:"),
    "offset-two-values": (lambda st: setattr(st, "offset", st.offset.repeat(2)), ValueError, r"\.offset:"),
    "blocksize-zero": (lambda st: setattr(st.state2, "blocksize", 0), ValueError, r"\.state2\.blocksize:"),
}


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("case", list(BAD_NESTED))
def test_nf4_dequantize_refuses_inconsistent_nested_state(backend, case):
    packed, state = ops.nf4_quantize(torch.randn(300, 257), compress_statistics=True, backend="reference")
    state = copy.deepcopy(state)
    spoil, error, name = BAD_NESTED[case]
    spoil(state)
    with pytest.raises(error, match=rf"^absmax_or_quant_state{name}"):
        ops.nf4_dequantize(packed, state, backend=backend)


def test_nf4_kernels_reject_corrupt_sizes_directly():
    """A direct torch.ops call with inconsistent sizes raises instead of reading out of bounds."""
    skip_unless_backend("native", "cpu")
    packed, absmax = ops.nf4_quantize(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.slimrate.nf4_dequantize(packed.view(-1)[:-1], absmax, [8, 64], 64, torch.float32)
    with pytest.raises(RuntimeError, match="absmax"):
        torch.ops.slimrate.nf4_dequantize(packed.view(-1), absmax[:-1], [8, 64], 64, torch.float32)
    with pytest.raises(RuntimeError, match="blocksize"):
        torch.ops.slimrate.nf4_quantize(torch.randn(8), 3)

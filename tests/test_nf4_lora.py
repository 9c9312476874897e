"""nf4_lora_linear: forward and gradients (x, lora_x, A, B, bias) against float64 autograd through the
dequantized weight, with flash-attention's rule against the peft + bitsandbytes arithmetic run in the same
dtype (ops/reference.py); both CPU schedules (few tokens, panels), odd shapes, mixed adapter dtypes,
QuantStates, a real peft + bitsandbytes layer, opcheck, torch.compile, bad inputs."""

import pytest
import torch

from slimrate import ops
from slimrate.ops import reference

from helpers import DTYPE_IDS, assert_close_flash, skip_unless_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (out, in, r): odd in (rows start mid-byte and mid-block), in > the kernels' 1024-column chunk, r = 1.
LAYERS = [(37, 45, 4), (64, 128, 8), (6, 1100, 1), (130, 70, 16)]
# 1 and 3 tokens take the fused few-token schedules, 40 the panel + GEMM ones (csrc/cpu/nf4_cpu.cpp).
TOKENS = [1, 3, 40]
SCALING = 2.0  # lora_alpha / r of the seed recipe's adapter (docs/qlora.md §1)


def make_layer(out, inp, r, adapter_dtype=torch.float32, blocksize=64):
    w = torch.randn(out, inp) * 0.05
    packed, absmax = ops.nf4_quantize(w, blocksize, backend="reference")
    lora_A = (torch.randn(r, inp) / inp ** 0.5).to(adapter_dtype)
    lora_B = (torch.randn(out, r) * 0.1).to(adapter_dtype)  # non-zero: peft's zero init would hide the branch
    bias = torch.randn(out) * 0.1
    return packed, absmax, lora_A, lora_B, bias


def run(fn, x, packed, absmax, lora_A, lora_B, bias, lora_x, grad_y, **kw):
    """Output and gradients of every float input (None for those not given)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, lora_A, lora_B, bias, lora_x)]
    y = fn(leaves[0], packed, absmax, leaves[1], leaves[2], SCALING, leaves[3], lora_x=leaves[4], **kw)
    y.backward(grad_y.to(y.dtype))
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def check_layer(backend, dtype, out, inp, r, M, *, lora_x_distinct, with_bias=True, adapter_dtype=torch.float32,
                x_shape=None, blocksize=64):
    packed, absmax, lora_A, lora_B, bias = make_layer(out, inp, r, adapter_dtype, blocksize)
    bias = bias if with_bias else None
    shape = x_shape or (M, inp)
    x = torch.randn(shape).to(dtype)
    lora_x = torch.randn(shape).to(dtype) if lora_x_distinct else None
    grad_y = torch.randn(*shape[:-1], out)
    got = run(ops.nf4_lora_linear, x, packed, absmax, lora_A, lora_B, bias, lora_x, grad_y, backend=backend,
              blocksize=blocksize)
    same = run(ops.nf4_lora_linear, x, packed, absmax, lora_A, lora_B, bias, lora_x, grad_y, backend="reference",
               blocksize=blocksize)
    f64 = [None if t is None else t.double() for t in (x, lora_A, lora_B, bias, lora_x)]
    truth = run(ops.nf4_lora_linear, f64[0], packed, absmax, f64[1], f64[2], f64[3], f64[4], grad_y.double(),
                backend="reference", blocksize=blocksize)
    names = ["y", "grad x", "grad lora_A", "grad lora_B", "grad bias", "grad lora_x"]
    for name, g, s, t, ref in zip(names, got, same, truth, [x, x, lora_A, lora_B, bias, lora_x], strict=True):
        if t is None:
            assert g is None, name
            continue
        assert g.shape == t.shape and g.dtype == (x.dtype if name == "y" else ref.dtype), name
        assert_close_flash(g, s, t, g.dtype, what=f"{name} ({backend}, {DTYPE_IDS[dtype]}, {out}x{inp} r={r}, M={M})")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layer", LAYERS, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
def test_nf4_lora_linear_matches_float64(dtype, layer, tokens):
    skip_unless_backend("native", "cpu")
    check_layer("native", dtype, *layer, tokens, lora_x_distinct=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layer", [(37, 45, 4), (70, 130, 16)], ids=str)
@pytest.mark.parametrize("tokens", [1, 20])
def test_nf4_lora_linear_triton_matches_float64(dtype, layer, tokens):
    """Triton kernels (the interpreter when there is no GPU: small shapes), distinct lora_x on one layer."""
    skip_unless_backend("triton", "cpu")
    check_layer("triton", dtype, *layer, tokens, lora_x_distinct=layer[0] == 37)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens", TOKENS)
def test_nf4_lora_linear_distinct_lora_input_and_adapter_dtypes(dtype, tokens):
    """lora_x = dropout(x) in peft; adapters in the activation dtype or float32; no bias."""
    skip_unless_backend("native", "cpu")
    check_layer("native", dtype, 37, 45, 4, tokens, lora_x_distinct=True, with_bias=False)
    check_layer("native", dtype, 64, 128, 8, tokens, lora_x_distinct=True, adapter_dtype=dtype)


@pytest.mark.parametrize("x_shape", [(45,), (2, 3, 45)], ids=str)
def test_nf4_lora_linear_leading_dims(x_shape):
    skip_unless_backend("native", "cpu")
    check_layer("native", torch.float32, 37, 45, 4, 0, lora_x_distinct=True, x_shape=x_shape)


@pytest.mark.parametrize("tokens", [3, 40])
def test_nf4_lora_linear_noncontiguous_x(tokens):
    skip_unless_backend("native", "cpu")
    packed, absmax, lora_A, lora_B, bias = make_layer(37, 45, 4)
    x = torch.randn(45, tokens).t()
    assert not x.is_contiguous()
    want = reference.nf4_lora_linear(x.double(), packed, absmax, 37, 64, None, lora_A.double(), lora_B.double(),
                                     SCALING, bias.double())
    got = ops.nf4_lora_linear(x, packed, absmax, lora_A, lora_B, SCALING, bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocksize", [32, 2048])
def test_nf4_lora_linear_other_blocksizes(blocksize):
    skip_unless_backend("native", "cpu")
    for tokens in (3, 40):
        check_layer("native", torch.bfloat16, 20, 1100, 4, tokens, lora_x_distinct=False, blocksize=blocksize)


def test_nf4_lora_linear_accepts_quant_states():
    """Plain and double-quantized bitsandbytes QuantStates give the op on their dequantized absmax."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    skip_unless_backend("native", "cpu")
    w = torch.randn(48, 128) * 0.05
    x, lora_A, lora_B = torch.randn(3, 128), torch.randn(4, 128) * 0.1, torch.randn(48, 4) * 0.1
    for nested in (False, True):
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
        y = ops.nf4_lora_linear(x, packed, state, lora_A, lora_B, SCALING)
        w_deq = bnbf.dequantize_4bit(packed, state)  # rows of whole blocks: bitsandbytes' CPU kernel is right
        want = x @ w_deq.t() + SCALING * (x @ lora_A.t()) @ lora_B.t()
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_nf4_lora_linear_matches_peft_bitsandbytes_layer():
    """A real peft LoRA layer around a bitsandbytes Linear4bit (train mode before any forward, docs/qlora.md
    §8): same output and gradients in float32."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    skip_unless_backend("native", "cpu")
    base = bnb.nn.Linear4bit(128, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(48, 128) * 0.05, requires_grad=False, quant_type="nf4")
    holder = torch.nn.Sequential()
    holder.add_module("proj", base.to("cpu"))
    model = peft.get_peft_model(holder, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    model.train()
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, 128, requires_grad=True)
    y = model(x)
    y.backward(torch.ones_like(y))
    want = [y.detach(), x.grad, lora_A.grad, lora_B.grad]
    x2 = x.detach().clone().requires_grad_()
    lA, lB = lora_A.detach().clone().requires_grad_(), lora_B.detach().clone().requires_grad_()
    y2 = ops.nf4_lora_linear(x2, base.weight.data, base.weight.quant_state, lA, lB, layer.scaling["default"],
                             base.bias)
    y2.backward(torch.ones_like(y2))
    for name, g, w in zip(["y", "grad x", "grad lora_A", "grad lora_B"], [y2.detach(), x2.grad, lA.grad, lB.grad],
                          want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_nf4_lora_linear_ops_pass_opcheck():
    skip_unless_backend("native", "cpu")
    packed, absmax, lora_A, lora_B, bias = make_layer(37, 45, 4)
    flat = packed.view(-1)
    for tokens in (2, 40):  # both schedules
        x = torch.randn(tokens, 45, requires_grad=True)
        args = (x, flat, absmax, 37, 64, None, lora_A.requires_grad_(), lora_B.requires_grad_(), SCALING,
                bias.requires_grad_())
        torch.library.opcheck(torch.ops.slimrate.nf4_lora_linear.default, args)
        g = torch.randn(tokens, 37)
        torch.library.opcheck(torch.ops.slimrate.nf4_linear_grad_input.default,
                              (g, flat, absmax, 45, 64, torch.randn(tokens, 4), lora_A.detach()))
    lx = torch.randn(3, 45, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.slimrate.nf4_lora_linear.default,
                          (lx * 2, flat, absmax, 37, 64, lx, lora_A.detach(), lora_B.detach(), SCALING, None))
    torch.library.opcheck(torch.ops.slimrate.nf4_linear_grad_input.default,
                          (torch.randn(3, 37, dtype=torch.float16), flat, absmax, 45, 64, None, None))


def test_nf4_lora_linear_compiles_fullgraph():
    skip_unless_backend("native", "cpu")
    packed, absmax, lora_A, lora_B, bias = make_layer(37, 45, 4)
    x = torch.randn(3, 45, requires_grad=True)
    lora_A.requires_grad_()

    def layer(x, lora_A):
        return ops.nf4_lora_linear(x, packed, absmax, lora_A, lora_B, SCALING, bias).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, lora_A), [x, lora_A])
    want = torch.autograd.grad(layer(x, lora_A), [x, lora_A])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_nf4_lora_linear_rejects_bad_inputs():
    packed, absmax, lora_A, lora_B, bias = make_layer(37, 45, 4)
    x = torch.randn(3, 45)

    def call(**kw):
        args = dict(x=x, packed=packed, quant_state_or_absmax=absmax, lora_A=lora_A, lora_B=lora_B, scaling=SCALING,
                    bias=bias, backend="reference")
        args.update(kw)
        return ops.nf4_lora_linear(**args)

    with pytest.raises(ValueError, match="packed"):
        call(packed=packed[:-1])
    with pytest.raises(ValueError, match="packed"):  # wrong weight shape for these bytes
        call(x=torch.randn(3, 44), lora_A=torch.randn(4, 44))
    with pytest.raises(ValueError, match="absmax"):  # blocksize mismatch
        call(blocksize=128)
    with pytest.raises(ValueError, match="blocksize"):
        call(blocksize=100)
    with pytest.raises(ValueError, match="lora_B"):  # rank mismatch
        call(lora_B=torch.randn(37, 5))
    with pytest.raises(ValueError, match="lora_A"):
        call(lora_A=torch.randn(4, 44))
    with pytest.raises(TypeError, match="x"):
        call(x=x.long())
    with pytest.raises(TypeError, match="lora_A"):
        call(lora_A=lora_A.long())
    with pytest.raises(TypeError, match="x"):
        call(x=x.double(), backend="native")
    with pytest.raises(ValueError, match="lora_x"):
        call(lora_x=torch.randn(2, 45))
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.randn(36))
    with pytest.raises(TypeError, match="scaling"):
        call(scaling="2")
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")


def test_nf4_lora_kernels_reject_mismatched_sizes_directly():
    skip_unless_backend("native", "cpu")
    packed, absmax, lora_A, lora_B, _ = make_layer(37, 45, 4)
    x = torch.randn(3, 45)
    with pytest.raises(RuntimeError, match="lora_B"):
        torch.ops.slimrate.nf4_lora_linear(x, packed.view(-1), absmax, 37, 64, None, lora_A, lora_B[:, :3], 1.0, None)
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.slimrate.nf4_lora_linear(torch.randn(3, 46), packed.view(-1), absmax, 37, 64, None,
                                           torch.randn(4, 46), lora_B, 1.0, None)
    with pytest.raises(RuntimeError, match="lora_grad_h"):
        torch.ops.slimrate.nf4_linear_grad_input(torch.randn(3, 37), packed.view(-1), absmax, 45, 64, None, lora_A)


def test_reference_dequantize_is_the_truth_in_float64():
    """The float64 reference multiplies the float32 code by the float32 absmax exactly as bitsandbytes does."""
    packed, absmax, *_ = make_layer(5, 64, 1)
    w64 = reference.nf4_dequantize(packed, absmax, [5, 64], 64, torch.float64)
    assert torch.equal(w64, reference.nf4_dequantize(packed, absmax, [5, 64], 64, torch.float32).double())

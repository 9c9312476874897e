"""One QLoRA layer, forward + backward on the CPU, beside what users run today (the QLoRA grid).

W [out, in] NF4 with double-quantized absmax (QLoRA's default, bnb_4bit_use_double_quant), LoRA r = 16,
scaling 2 (r = 16, α = 32: docs/qlora.md §1), float32 adapters (peft's default), x [tokens, in] requiring grad, shapes
4096×4096 and 11008×4096, 1/16/512 tokens, float32 and bfloat16 activations.  Groups
"nf4-lora-<out>x<in>-<dtype>-t<tokens>", rows:
- bnb-peft:    a peft LoRA layer around a bitsandbytes Linear4bit (train mode before the first forward:
               docs/qlora.md §8), dequantizing W in its forward and again in its backward;
- bnb-dequant: unsloth's approach: bitsandbytes.functional.dequantize_4bit once, F.linear + the LoRA terms,
               autograd keeping the dequantized W for the backward;
- slimrate:    slimrate.ops.nf4_lora_linear (C++), W decoded tile by tile in the forward and the backward.
Groups "nf4-dequantize-<out>x<in>-<dtype>": bitsandbytes' dequantize_4bit vs slimrate.ops.nf4_dequantize
(plain absmax), rows bnb and slimrate.
Every row's output is checked against the bnb-peft layer before it is timed.  Report: bench/nf4_report.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from slimrate import ops

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")
peft = pytest.importorskip("peft")

SHAPES = [(4096, 4096), (11008, 4096)]
TOKENS = [1, 16, 512]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANK, ALPHA = 16, 32
ROWS = ["bnb-peft", "bnb-dequant", "slimrate"]


@functools.lru_cache(maxsize=1)
def layer(out: int, inp: int, dtype_name: str):
    """(peft model around one bnb Linear4bit, its LoRA layer); seeded weights, non-zero lora_B."""
    gen = torch.Generator().manual_seed(out + inp)
    dtype = DTYPES[dtype_name]
    base = bnb.nn.Linear4bit(inp, out, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(torch.randn(out, inp, generator=gen) * 0.02, requires_grad=False,
                                    quant_type="nf4", compress_statistics=True)
    holder = torch.nn.Sequential()
    holder.add_module("proj", base.to("cpu"))  # .to(device) quantizes
    model = peft.get_peft_model(holder, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    model.train()  # before any forward: an eval/no_grad forward repacks W and drops the LoRA gradients
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0, 0.02, generator=gen)
    return model, lora


def runner(name: str, model, lora, dtype):
    """fn(x, grad_y) -> y running forward + backward of one row."""
    base = lora.base_layer
    packed, state = base.weight.data, base.weight.quant_state
    lora_A, lora_B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    scaling = lora.scaling["default"]
    if name == "bnb-peft":
        forward = model
    elif name == "bnb-dequant":
        def forward(x):
            w = bnbf.dequantize_4bit(packed, state).to(dtype)
            return F.linear(x, w) + (F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling).to(dtype)
    else:
        def forward(x):
            return ops.nf4_lora_linear(x, packed, state, lora_A, lora_B, scaling)

    def step(x, grad_y):
        y = forward(x)
        y.backward(grad_y)
        x.grad = lora_A.grad = lora_B.grad = None
        return y

    return step


GRID = [(shape, dtype, tokens, name) for shape in SHAPES for dtype in DTYPES for tokens in TOKENS for name in ROWS]


@pytest.mark.parametrize("shape,dtype,tokens,name", GRID,
                         ids=[f"{o}x{i}-{d}-t{t}-{n}" for (o, i), d, t, n in GRID])
def test_nf4_lora_layer(benchmark, shape, dtype, tokens, name):
    out, inp = shape
    model, lora = layer(out, inp, dtype)
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, inp, generator=gen).to(dt).requires_grad_()
    grad_y = torch.randn(tokens, out, generator=gen).to(dt)
    step = runner(name, model, lora, dt)
    want = runner("bnb-peft", model, lora, dt)(x, grad_y).double()
    err = ((step(x, grad_y).double() - want).norm() / want.norm()).item()
    assert err < (1e-5 if dt == torch.float32 else 2e-2), f"{name}: relative error {err:.3g} against bnb-peft"
    benchmark.group = f"nf4-lora-{out}x{inp}-{dtype}-t{tokens}"
    benchmark.name = name
    benchmark.extra_info.update(backend=name, out=out, inp=inp, tokens=tokens, dtype=dtype, rank=RANK)
    benchmark.pedantic(step, args=(x, grad_y), rounds=10 if tokens < 512 else 5, warmup_rounds=1)


DEQUANT_GRID = [(shape, dtype, name) for shape in SHAPES for dtype in DTYPES for name in ("bnb", "slimrate")]


@pytest.mark.parametrize("shape,dtype,name", DEQUANT_GRID,
                         ids=[f"{o}x{i}-{d}-{n}" for (o, i), d, n in DEQUANT_GRID])
def test_nf4_dequantize(benchmark, shape, dtype, name):
    out, inp = shape
    gen = torch.Generator().manual_seed(out)
    packed, state = bnbf.quantize_4bit(torch.randn(out, inp, generator=gen) * 0.02, quant_type="nf4")
    state.dtype = DTYPES[dtype]
    if name == "bnb":
        def fn():
            return bnbf.dequantize_4bit(packed, state)
    else:
        def fn():
            return ops.nf4_dequantize(packed, state.absmax, (out, inp), 64, DTYPES[dtype])
    assert torch.equal(fn(), bnbf.dequantize_4bit(packed, state))
    benchmark.group = f"nf4-dequantize-{out}x{inp}-{dtype}"
    benchmark.name = name
    # bytes moved: packed + absmax read, W written
    nbytes = packed.numel() + state.absmax.numel() * 4 + out * inp * DTYPES[dtype].itemsize
    benchmark.extra_info.update(backend=name, out=out, inp=inp, dtype=dtype, bytes=nbytes)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)

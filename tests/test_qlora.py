"""slimrate.qlora's peft drop-in: patch_peft / unpatch_peft against peft + bitsandbytes on a tiny 4-bit
Mistral and on single Linear4bit layers (outputs, gradients, dropout, bias, dtypes, unsupported
layers), adapter save/load, the merged model, and bitsandbytes' AVX512-BF16 repack (docs/qlora.md §8)."""

import importlib
import importlib.util

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from slimrate.qlora import (  # noqa: E402
    RepackedWeightError,
    load_4bit,
    patch_peft,
    patched_layers,
    prevent_cpu_repack,
    save_merged,
    unpatch_peft,
)
from slimrate.qlora.tiny import build_tiny_mistral, save_tiny_base  # noqa: E402

from helpers import rel_err  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LORA_LAYERS = 2 * len(TARGETS)  # 2 decoder layers
FP32_TOL = 1e-5  # the reference backend repeats peft + bitsandbytes' fp32 arithmetic; kernels differ by rounding


def fused_backends():
    """The nf4_lora_linear backends to test, each skipped with a reason when it is not there."""
    native = pytest.mark.skipif(not hasattr(torch.ops.slimrate, "nf4_lora_linear"),
                                reason="slimrate._C is not built with nf4_lora_linear")
    triton_ok = importlib.util.find_spec("triton") is not None and \
        hasattr(importlib.import_module("slimrate.triton_kernels"), "nf4_lora_linear_triton")
    triton = pytest.mark.skipif(not triton_ok, reason="no Triton nf4_lora_linear kernel here")
    return ["reference", pytest.param("native", marks=native), pytest.param("triton", marks=triton)]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny") / "base", seed=0)


def lora_config(dropout=0.0, **kw):
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM", **kw)


def tiny_4bit(path, dropout=0.0, **kw):
    """The tiny model in 4-bit with LoRA; lora_B random (peft starts it at 0, which would hide B·A)."""
    model = load_4bit(path, lora_config(dropout, **kw), compute_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def forward_backward(model, ids):
    """logits, d loss / d inputs_embeds and the LoRA gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    return out.logits.detach(), embeds.grad, {n: p.grad.clone() for n, p in lora_params(model).items()}


def assert_same(a, b, tol, what):
    assert rel_err(a, b.double()) <= tol, f"{what}: rel err {rel_err(a, b.double()):.3g} > {tol}"


@pytest.mark.parametrize("backend", fused_backends())
def test_patch_peft_matches_unpatched_tiny_mistral(tiny_base, backend):
    model = tiny_4bit(tiny_base)
    ids = torch.randint(6, 100, (2, 23))
    logits, dx, grads = forward_backward(model, ids)
    assert patch_peft(model, backend=backend) == N_LORA_LAYERS
    logits_f, dx_f, grads_f = forward_backward(model, ids)
    assert_same(logits_f, logits, FP32_TOL, "logits")
    assert_same(dx_f, dx, FP32_TOL, "d loss / d inputs_embeds")
    assert grads.keys() == grads_f.keys() and len(grads) == 2 * N_LORA_LAYERS
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        assert_same(grads_f[name], grads[name], FP32_TOL, name)


def test_unpatch_restores_peft_forward_and_repack_switch(tiny_base):
    model = tiny_4bit(tiny_base)
    ids = torch.randint(6, 100, (1, 9))
    switches = {n: m.support_avx512bf16_for_cpu for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert patch_peft(model, backend="reference") == N_LORA_LAYERS
    assert patch_peft(model, backend="reference") == N_LORA_LAYERS  # again: same layers, no double wrapping
    assert len(patched_layers(model)) == N_LORA_LAYERS
    assert model.state_dict().keys() == keys.keys()
    assert unpatch_peft(model) == N_LORA_LAYERS
    assert patched_layers(model) == [] and unpatch_peft(model) == 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert switches == {n: m.support_avx512bf16_for_cpu for n, m in model.named_modules()
                        if isinstance(m, bnb.nn.Linear4bit)}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_adapter_save_load_round_trip_after_patching(tiny_base, tmp_path):
    model = tiny_4bit(tiny_base)
    patch_peft(model, backend="reference")
    ids = torch.randint(6, 100, (2, 11))
    optimizer = torch.optim.AdamW(lora_params(model).values(), lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = load_4bit(tiny_base, tmp_path / "adapter", compute_dtype=torch.float32)
    for name, p in lora_params(model).items():
        assert torch.equal(loaded.get_parameter(name), p.detach()), name
    loaded.eval()
    with torch.no_grad():
        unpatched = loaded(input_ids=ids).logits
        assert patch_peft(loaded, backend="reference") == N_LORA_LAYERS
        patched = loaded(input_ids=ids).logits
    assert_same(unpatched, expected, FP32_TOL, "reloaded, unpatched")
    assert_same(patched, expected, FP32_TOL, "reloaded, patched")


def test_load_4bit_refuses_a_folder_with_only_a_pickle(tmp_path):
    """A pytorch_model.bin is never loaded, even where transformers would (weights_only=True) fall back to it."""
    model = build_tiny_mistral(vocab_size=40)
    model.config.save_pretrained(tmp_path)
    # transformers 5 writes safetensors even with safe_serialization=False: save the pickle as older versions did
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"^path: .* holds no model.safetensors .*pytorch_model.bin, a pickle.*"
                                         r"save_pretrained\(folder\)"):
        load_4bit(tmp_path, lora_config())
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match=r"^path: .* holds no model.safetensors or model.safetensors.index.json;"):
        load_4bit(tmp_path, lora_config())


def test_load_4bit_reads_sharded_safetensors(tmp_path):
    model = build_tiny_mistral(vocab_size=40, seed=3)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 40, (2, 9))
    logits = []
    for folder in ("one", "sharded"):
        loaded = load_4bit(tmp_path / folder, lora_config(), compute_dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(loaded(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
def test_lora_grads_nonzero_after_eval_forward_and_training(tiny_base, fused):
    """The pitfall's trigger first (an eval-mode no_grad forward), then training: every LoRA matrix
    gets a non-zero gradient and lora_B moves from its zero start."""
    model = load_4bit(tiny_base, lora_config(), compute_dtype=torch.float32)
    if fused:
        patch_peft(model, backend="reference")
    ids = torch.randint(6, 100, (2, 13))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    model.train()
    optimizer = torch.optim.AdamW(lora_params(model).values(), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in lora_params(model).items():
            if step or "lora_B" in name:  # B starts at 0, so dA = s·(g·B)ᵀ·x is 0 at the first step
                assert p.grad is not None and p.grad.abs().sum() > 0, f"step {step}: {name}"
        optimizer.step()
    assert all(p.abs().sum() > 0 for n, p in lora_params(model).items() if "lora_B" in n)


def test_merged_model_matches_4bit_lora_model(tiny_base, tmp_path):
    model = tiny_4bit(tiny_base)
    ids = torch.randint(6, 100, (2, 15))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_merged(model, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    with torch.no_grad():
        assert_same(merged(input_ids=ids).logits, expected, 1e-5, "merged logits")


# ---- single Linear4bit layers: bias, dropout, dtypes, unsupported set-ups ----

class OneLinear(nn.Module):
    is_loaded_in_4bit = True  # what transformers sets; peft then wraps Linear4bit in lora.bnb.Linear4bit

    def __init__(self, inp=100, out=80, bias=True, quant_type="nf4", dtype=torch.float32):
        super().__init__()
        self.lin = bnb.nn.Linear4bit(inp, out, bias=bias, compute_dtype=dtype, quant_type=quant_type)
        self.lin.weight.data.normal_(0, 0.05)
        if bias:
            self.lin.bias.data.normal_()
        self.to("cpu")  # bitsandbytes quantizes on .to(device)

    def forward(self, x):
        return self.lin(x)


def one_layer_lora(dropout=0.0, **kw):
    model = get_peft_model(OneLinear(**kw), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["lin"]))
    with torch.no_grad():
        model.base_model.model.lin.lora_B.default.weight.normal_()
    return model.train()


def step_of(model, x, seed):
    """y, dL/dx and LoRA gradients, with the dropout mask drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in lora_params(model).items()}


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_patched_layer_matches_peft(backend, dtype, tol, dropout, bias):
    model = one_layer_lora(dropout, bias=bias, dtype=dtype)
    x = torch.randn(3, 5, 100).to(dtype)  # leading dims (3, 5)
    y, dx, grads = step_of(model, x, seed=7)
    assert patch_peft(model, backend=backend) == 1
    y_f, dx_f, grads_f = step_of(model, x, seed=7)  # same seed: the same dropout mask
    assert y_f.shape == y.shape and y_f.dtype == y.dtype
    assert_same(y_f, y, tol, "y")
    assert_same(dx_f, dx, tol, "dL/dx")
    for name in grads:
        assert_same(grads_f[name], grads[name], tol, name)


def test_patched_layer_runs_peft_forward_when_adapters_disabled():
    model = one_layer_lora()
    x = torch.randn(4, 100)
    with torch.no_grad():
        base = model.base_model.model.lin.base_layer(x)
        patch_peft(model, backend="reference")
        with model.disable_adapter():
            assert torch.equal(model(x), base)
        assert not torch.allclose(model(x), base)


def test_patch_peft_skips_unsupported_layers():
    assert patch_peft(one_layer_lora(quant_type="fp4")) == 0  # FP4, not NF4
    dora = get_peft_model(OneLinear(), LoraConfig(r=4, target_modules=["lin"], use_dora=True))
    assert patch_peft(dora) == 0
    two = one_layer_lora()
    two.add_adapter("second", LoraConfig(r=2, target_modules=["lin"]))
    two.base_model.set_adapter(["default", "second"])
    assert patch_peft(two) == 0
    merged = one_layer_lora()
    merged.merge_adapter()
    assert patch_peft(merged) == 0 and patched_layers(merged) == []


def test_patch_peft_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        patch_peft(one_layer_lora(), backend="cuda-magic")


# ---- bitsandbytes' AVX512-BF16 repack (docs/qlora.md §8) ----

def repack(linear4bit):
    """What bitsandbytes does on an eval-mode no_grad forward on an AVX512-BF16 CPU, done directly (its
    repacking function is plain PyTorch), so the test does not depend on this machine's CPU.
    Needs out_features divisible by 32 and in_features by the block size."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    w = linear4bit.weight
    w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)


def test_patch_peft_refuses_a_repacked_weight():
    model = one_layer_lora(inp=128, out=96)
    repack(model.base_model.model.lin.base_layer)
    with pytest.raises(RepackedWeightError, match=r"base_model.model.lin: .*repacked.*Reload"):
        patch_peft(model)
    assert patched_layers(model) == []
    with pytest.raises(RepackedWeightError, match="repacked"):
        prevent_cpu_repack(model)


def test_patched_forward_refuses_a_weight_repacked_later():
    model = one_layer_lora(inp=128, out=96)
    patch_peft(model, backend="reference")
    repack(model.base_model.model.lin.base_layer)
    with pytest.raises(RepackedWeightError, match="base_model.model.lin"):
        model(torch.randn(2, 128))


def test_prevent_cpu_repack_keeps_the_standard_layout():
    model = one_layer_lora()
    model.base_model.model.lin.base_layer.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU
    assert prevent_cpu_repack(model) == 1
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 100))
    state = model.base_model.model.lin.base_layer.weight.quant_state
    assert not getattr(state, "packing_format_for_cpu", False)

"""Drop-in for peft + bitsandbytes: run peft's 4-bit LoRA layers through ``slimrate.ops.nf4_lora_linear``.

``patch_peft(model)`` swaps the ``forward`` of each peft ``lora.bnb.Linear4bit`` layer (one per
instance, as an instance attribute, in the style of Liger-Kernel's instance patching) for one call of
the fused op: y = x·deq(W)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + b.  Nothing else changes: the same parameters,
the same ``state_dict`` keys, so peft's ``save_pretrained`` / ``PeftModel.from_pretrained`` work as
before, and ``unpatch_peft(model)`` deletes the instance attributes again.

Which layers are patched: those with one active adapter, plain LoRA (no DoRA or other peft
variant, no ``lora_bias``), not merged, over an NF4 weight stored as uint8.  Any other layer is
left as peft made it and not counted.  A patched layer whose state later changes to one of those
(``with model.disable_adapter():``, ``merge_adapter()``, ``set_adapter([...])`` with several,
``adapter_names=`` mixed batches) runs peft's own forward for those calls.

The AVX512-BF16 repack (docs/qlora.md §8): on such CPUs bitsandbytes' ``Linear4bit.forward`` in
eval mode with an input that needs no gradient rewrites the weight in place into a layout for its
``gemv_4bit`` kernel (``weight.quant_state.packing_format_for_cpu = True``: nibbles regrouped in
32-row tiles, absmax transposed and rounded to bf16, double quantization undone).  That layout is not
bitsandbytes' standard NF4 layout, its absmax has lost precision, and its kernel has no autograd.
So ``patch_peft`` refuses a model holding such a weight (``RepackedWeightError``, naming the layer),
and the patched forward checks the flag on every call; ``prevent_cpu_repack`` switches the repack
off (``support_avx512bf16_for_cpu = False``) on every bitsandbytes ``Linear4bit``, which
``slimrate.qlora.load_4bit`` does right after loading.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from slimrate import ops
from slimrate.ops.backend import resolve_backend

# The flag bitsandbytes sets on a QuantState whose weight it repacked for the CPU gemv kernel
# (bitsandbytes/functional.py, _convert_weight_packed_for_cpu).
REPACK_FLAG = "packing_format_for_cpu"
# The Linear4bit attribute that lets an eval-mode forward repack (bitsandbytes/nn/modules.py).
REPACK_SWITCH = "support_avx512bf16_for_cpu"
_PATCHED = "_slimrate_fused"  # marks a patched layer; holds the backend and the saved repack switch


class RepackedWeightError(ValueError):
    """A bitsandbytes weight was repacked for the CPU gemv kernel and cannot be used by the fused op."""


def _lora_4bit_classes() -> tuple[type, ...]:
    """peft's LoRA layer over a bitsandbytes Linear4bit (defined only when bitsandbytes is importable)."""
    from peft.tuners.lora import bnb as peft_bnb

    return (peft_bnb.Linear4bit,) if hasattr(peft_bnb, "Linear4bit") else ()


def _bnb_linear4bit() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def is_repacked(linear4bit: nn.Module) -> bool:
    """True when bitsandbytes has repacked this Linear4bit's weight for its CPU gemv kernel."""
    state = getattr(linear4bit.weight, "quant_state", None)
    return bool(getattr(state, REPACK_FLAG, False))


def _repack_message(name: str) -> str:
    return (f"{name}: the bitsandbytes weight was repacked for its CPU gemv kernel ({REPACK_FLAG}=True): an "
            "eval-mode forward under no_grad on a CPU with AVX512-BF16 does this in place; the layout is no longer "
            "standard NF4, its absmax was rounded to bf16 and gradients through it are silently dropped. Reload "
            "the model and call slimrate.qlora.prevent_cpu_repack(model) (load_4bit does) or model.train() "
            "before any forward")


def prevent_cpu_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on eval-mode CPU forwards (docs/qlora.md §8).

    Sets ``support_avx512bf16_for_cpu = False`` on every ``bitsandbytes.nn.Linear4bit`` in ``model``;
    inference then dequantizes and multiplies as in training (no gemv fast path).  Raises
    ``RepackedWeightError`` if a weight was already repacked.  Returns the number of layers set.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, _bnb_linear4bit()):
            if is_repacked(module):
                raise RepackedWeightError(_repack_message(name))
            setattr(module, REPACK_SWITCH, False)
            count += 1
    return count


def _single_adapter(layer: nn.Module) -> str | None:
    """The name of the one active plain-LoRA adapter the fused op can run, or None."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or layer.merged or layer.disable_adapters:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None  # DoRA / aLoRA / Arrow variants, lora_bias: not what the op computes
    return name


def _fusable_weight(layer: nn.Module) -> bool:
    weight = layer.get_base_layer().weight
    state = getattr(weight, "quant_state", None)
    return state is not None and state.quant_type == "nf4" and weight.dtype == torch.uint8


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``lora.bnb.Linear4bit.forward`` as one ``nf4_lora_linear`` call (module docstring)."""
    name = None if args or kwargs else _single_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    patch = getattr(self, _PATCHED)
    if is_repacked(base):
        raise RepackedWeightError(_repack_message(patch["name"]))
    # bitsandbytes' compute-dtype rule (Linear4bit.set_compute_type): the first fp32/bf16 input sets it.
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dtype = base.compute_dtype or x.dtype
    xc = x.to(dtype)
    dropout = self.lora_dropout[name]
    lora_x = None if isinstance(dropout, nn.Identity) else dropout(xc)
    weight = base.weight
    # [..., in] → [..., out]; the LoRA branch runs in the adapters' dtype (fp32 by default), as in peft.
    y = ops.nf4_lora_linear(xc, weight.data, weight.quant_state, self.lora_A[name].weight, self.lora_B[name].weight,
                            float(self.scaling[name]), base.bias, lora_x=lora_x, backend=patch["backend"])
    return y.to(x.dtype)


def patch_peft(model: nn.Module, *, backend: str | None = None) -> int:
    """Run peft's 4-bit LoRA layers in ``model`` through ``slimrate.ops.nf4_lora_linear``.

    model: a peft model (or any module) holding ``peft.tuners.lora.bnb.Linear4bit`` layers.
    backend: passed to ``nf4_lora_linear`` ("native", "triton", "reference"; None: the default).
    Patches only supported layers (module docstring) and switches bitsandbytes' CPU repack off on
    their base layers (restored by ``unpatch_peft``).  Parameters, buffers and ``state_dict`` are
    unchanged.  Patching twice is a no-op for layers already patched (their backend is updated).
    Raises ``RepackedWeightError`` before patching anything if a weight was repacked.
    Returns the number of layers patched (already patched ones included).
    """
    if backend is not None:
        resolve_backend("nf4_lora_linear", backend)  # ValueError listing the valid names
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _lora_4bit_classes())]
    for name, layer in layers:
        if is_repacked(layer.get_base_layer()):
            raise RepackedWeightError(_repack_message(name))
    count = 0
    for name, layer in layers:
        if not (_single_adapter(layer) and _fusable_weight(layer)):
            continue
        base = layer.get_base_layer()
        state = getattr(layer, _PATCHED, None) or {"name": name, "switch": getattr(base, REPACK_SWITCH, None)}
        state["backend"] = backend
        setattr(layer, _PATCHED, state)
        if state["switch"] is not None:
            setattr(base, REPACK_SWITCH, False)
        layer.forward = types.MethodType(_fused_forward, layer)
        count += 1
    return count


def unpatch_peft(model: nn.Module) -> int:
    """Undo ``patch_peft``: peft's own forward and bitsandbytes' repack switch as they were.
    Returns the number of layers restored."""
    count = 0
    for _, layer in model.named_modules():
        state = layer.__dict__.pop(_PATCHED, None)
        if state is None:
            continue
        layer.__dict__.pop("forward", None)
        if state["switch"] is not None:
            setattr(layer.get_base_layer(), REPACK_SWITCH, state["switch"])
        count += 1
    return count


def patched_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that ``patch_peft`` patched."""
    return [name for name, m in model.named_modules() if _PATCHED in m.__dict__]

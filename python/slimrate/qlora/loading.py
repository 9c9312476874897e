"""Load a causal LM in 4-bit NF4 with LoRA adapters (transformers + bitsandbytes + peft), and merge
the adapters into a dequantized 16/32-bit copy of the base.

Merging follows unsloth's advice (docs/qlora.md §9): peft's ``merge_and_unload`` on a 4-bit model
adds the LoRA delta and quantizes the sum back to NF4, losing the delta's precision; here each NF4
weight is dequantized (the exact values the 4-bit model computes with) and W + s·B·A is kept in
the chosen float dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimrate.checkpoints import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, local_model_folder
from slimrate.qlora.peft_patch import prevent_cpu_repack

PEFT_PREFIX = "base_model.model."  # peft's prefix on the wrapped model's parameter names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_4bit(path: str | os.PathLike, lora_config, *, compute_dtype: torch.dtype = torch.bfloat16,
              double_quant: bool = True, device_map: str | dict | None = None):
    """A local causal LM loaded in 4-bit NF4 with LoRA adapters, ready to train.

    path: a local model folder (config.json + model.safetensors or model.safetensors.index.json with its
    shards); never looked up online.  Only safetensors weights are read, never a pickle (pytorch_model.bin).
    lora_config: a ``peft.LoraConfig`` (task_type "CAUSAL_LM") for fresh adapters, or the folder of a
    saved adapter (peft ``save_pretrained`` output) to continue training it.
    compute_dtype: bitsandbytes' compute dtype (``bnb_4bit_compute_dtype``); double_quant: also
    quantize the absmax (``bnb_4bit_use_double_quant``, QLoRA's 4.127 bits/param).
    device_map: transformers' (e.g. {"": "cuda"}); None loads on the CPU.
    Returns the peft model in train mode, with bitsandbytes' CPU repack switched off
    (``prevent_cpu_repack``), so gradients flow even after eval-mode forwards.
    Raises ValueError when path is not a local model folder or holds no safetensors weights.
    """
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = safetensors_model_folder(path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=compute_dtype,
                                                device_map=device_map, local_files_only=True, use_safetensors=True)
    prevent_cpu_repack(base)
    if isinstance(lora_config, (str, os.PathLike)):
        if not (Path(lora_config) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"lora_config: {lora_config} holds no adapter_config.json; expected a LoraConfig "
                                    "or a folder written by peft's save_pretrained")
        model = PeftModel.from_pretrained(base, lora_config, is_trainable=True, local_files_only=True)
    else:
        model = get_peft_model(base, lora_config)
    model.train()  # before any forward: docs/qlora.md §8
    return model


def safetensors_model_folder(path: str | os.PathLike) -> Path:
    """``path`` as a local model folder whose weights are safetensors (model.safetensors, or
    model.safetensors.index.json naming the shards), the files from_pretrained(use_safetensors=True) reads;
    ValueError naming the folder otherwise.  A folder may be untrusted, so a pickle is never a fallback."""
    folder = local_model_folder(path)
    if (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file():
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    held = f"it holds {pickles[0]}, a pickle, which is never loaded (loading one can run code); " if pickles else ""
    raise ValueError(f"path: {folder} holds no {SINGLE_FILE} or {INDEX_FILE}; {held}load_4bit reads safetensors "
                     "weights only: convert the folder once where you trust its files, with "
                     "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)")


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (a peft model over a 4-bit base) with every NF4 weight
    dequantized and every active LoRA adapter added: W + s·B·A in ``dtype``, keys as in the plain model;
    modules in peft's ``modules_to_save`` contribute their trained copy.

    Only plain LoRA on Linear4bit or nn.Linear layers with one active adapter is merged; anything
    else raises ValueError rather than writing a model that differs from the trained one.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    state: dict[str, torch.Tensor] = {}
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora_layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    # modules_to_save: a trained full copy replaces the original module (peft's ModulesToSaveWrapper)
    copies = {name: m for name, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    for name, wrapper in copies.items():
        active = [a for a in wrapper.active_adapters if a in wrapper.modules_to_save]
        trained = wrapper.original_module if wrapper.disable_adapters or not active else \
            wrapper.modules_to_save[active[0]]
        for key, tensor in trained.state_dict().items():
            state[f"{name}.{key}"] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.clone()
    wrapped = lora_layers | copies
    for name, module in inner.named_modules():
        if name in wrapped or any(name.startswith(f"{prefix}.") for prefix in wrapped):
            continue
        for key, tensor in module.named_parameters(recurse=False):
            state[f"{name}.{key}" if name else key] = tensor.detach().to(dtype)
        for key, tensor in module.named_buffers(recurse=False):
            if key not in module._non_persistent_buffers_set:
                state[f"{name}.{key}" if name else key] = tensor.detach().clone()
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    for name, layer in lora_layers.items():
        base = layer.get_base_layer()
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1 or active[0] in layer.lora_variant or layer.merged:
            raise ValueError(f"model: {name} has active adapters {layer.active_adapters} (merged={layer.merged}); "
                             "only one plain LoRA adapter per layer, not yet merged, can be merged here")
        adapter = active[0]
        if isinstance(base, bnb.nn.Linear4bit):
            weight = dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        elif isinstance(base, nn.Linear):
            weight = base.weight.detach().float()
        else:
            raise ValueError(f"model: {name} wraps a {type(base).__name__}; only Linear4bit and nn.Linear are merged")
        delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()  # (out, r)·(r, in)
        state[f"{name}.weight"] = (weight + layer.scaling[adapter] * delta).detach().to(dtype)
        if base.bias is not None:
            state[f"{name}.bias"] = base.bias.detach().to(dtype)
    return state


def save_merged(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write ``merged_state_dict(model, dtype)`` as a plain (unquantized) transformers model folder:
    config.json without quantization settings, model.safetensors, and the tokenizer when given.
    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)``.  Returns the folder."""
    from transformers import AutoModelForCausalLM

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config.__class__.from_dict(inner.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    state = merged_state_dict(model, dtype)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise ValueError(f"model: the merged weights do not fit {type(plain).__name__}: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    out = Path(out_dir)
    plain.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out

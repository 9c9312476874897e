"""Rate-constrained LoRA adapters (docs/qlora.md §11): BackSlash's RateConstraint on the LoRA A/B matrices
only, the adapter written as an entropy-coded ``adapter.slim`` beside peft's ``adapter_model.safetensors``,
and ``load_adapter`` reading either file into a peft model.

Both files hold the same tensors under the same names: peft's ``get_peft_model_state_dict`` (the LoRA
matrices, and the full copies of ``modules_to_save``).  In the .slim file every float tensor with ≥ 2 dims is
quantized with one step Δ (|θ − θ̂| ≤ Δ/2) and exp-Golomb coded; the others are stored losslessly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from slimrate.backslash import RateConstraint, SlimFile, save_slim

SLIM_ADAPTER_FILE = "adapter.slim"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
# Δ of adapter.slim: max error 2.5e-4 per weight.  LoRA A starts uniform in ±1/√fan_in (±0.016 at 4096),
# so Δ is about 1/60 of that range on a 4096-wide model; held-out loss on the driver's tiny model:
# bench/results/qlora_adapter_rate.md.  Pick Δ relative to your adapter's weights.
DEFAULT_ADAPTER_STEP = 5e-4
SLIM_FORMAT_TAG = "peft-adapter"  # the .slim file's metadata "format"
_LORA_WEIGHT = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")  # peft: <layer>.lora_A.<adapter>.weight


def is_lora_weight(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    """A ``RateConstraint`` include filter: the A and B matrices of peft's LoRA layers, nothing else (not the
    base weights, not the ``modules_to_save`` copies)."""
    return bool(_LORA_WEIGHT.search(name))


def lora_rate_constraint(model: nn.Module, lam: float, mode: str = "loss", **kwargs) -> RateConstraint:
    """A ``RateConstraint`` over the LoRA A/B matrices of a peft ``model`` (ν and N pooled over them);
    ``kwargs`` go to ``RateConstraint``."""
    return RateConstraint(model, lam, mode=mode, include=is_lora_weight, **kwargs)


def save_adapter_slim(model: nn.Module, path: str | os.PathLike, step: float = DEFAULT_ADAPTER_STEP, *,
                      adapter_name: str = "default") -> Path:
    """Write the adapter ``adapter_name`` of a peft ``model`` as a .slim file (the tensors peft's
    ``save_pretrained`` writes, under the same names; float tensors with ≥ 2 dims quantized with step Δ =
    ``step``, exp-Golomb coded); returns the path."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return save_slim(state, path, step=step, metadata={"format": SLIM_FORMAT_TAG, "adapter_name": adapter_name})


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default") -> nn.Module:
    """Load an adapter file into the peft ``model``'s adapter ``adapter_name``, in place; returns the model.

    path: an ``adapter.slim`` (``save_adapter_slim``; values within Δ/2 of the trained ones) or peft's
    ``adapter_model.safetensors`` (loaded as peft's own ``load_adapter`` does: the same values).  The file
    must hold exactly the adapter's tensors (names as peft saves them) with the model's shapes; anything
    else raises ValueError naming the file, before the model is changed.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(path)
    if not hasattr(model, "peft_config") or adapter_name not in model.peft_config:
        raise ValueError(f"model: expected a peft model with an adapter {adapter_name!r}, got "
                         f"{type(model).__name__}; build it with slimrate.qlora.load_4bit or peft's get_peft_model")
    state = _read_adapter_file(path)
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"path: {path} does not match the model's adapter {adapter_name!r}: missing "
                         f"{missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}); "
                         "load an adapter trained with the same LoraConfig on the same base")
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"path: {path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model's "
                         f"{tuple(expected[wrong[0]].shape)}; the adapter was trained with another rank or base")
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    return model


def _read_adapter_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter.slim or adapter_model.safetensors file; ValueError naming the file otherwise."""
    if path.is_dir():
        present = [name for name in (SLIM_ADAPTER_FILE, PEFT_ADAPTER_FILE) if (path / name).is_file()]
        raise ValueError(f"path: {path} is a folder; pass one adapter file in it"
                         + (f", e.g. {path / present[0]}" if present else f" ({SLIM_ADAPTER_FILE} or "
                            f"{PEFT_ADAPTER_FILE})"))
    if not path.is_file():
        raise FileNotFoundError(f"path: {path}: no such file (an {SLIM_ADAPTER_FILE} or {PEFT_ADAPTER_FILE})")
    if path.suffix == ".slim":
        with SlimFile(path) as f:  # SlimFormatError (a ValueError) naming the file when corrupt
            if f.metadata().get("format") != SLIM_FORMAT_TAG:
                raise ValueError(f"path: {path} is a .slim file but not an adapter (metadata format "
                                 f"{f.metadata().get('format')!r}); write adapters with save_adapter_slim")
            return {name: f.get_tensor(name) for name in f.keys()}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise ValueError(f"path: {path} is not a readable safetensors file ({error})") from None
    raise ValueError(f"path: {path}: expected an adapter file ending in .slim or .safetensors, got "
                     f"{path.suffix or 'no suffix'!r}")

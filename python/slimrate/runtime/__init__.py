"""Compressed-inference runtime for embedding: load a .slim (or safetensors / state-dict) model, dense or
sparse, and measure its latency and weight memory.

    model = slimrate.runtime.load("model.slim", model_factory="digits")         # built-in architecture
    model = slimrate.runtime.load("model.slim", model_factory=lambda: MyNet())   # any nn.Module
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimrate.sparse.linear import median_us, sparsify


@dataclass(frozen=True)
class ModelSpec:
    """A built-in architecture: build(state_dict) sizes the module from the weights; example(model, batch)
    gives a random input of the model's input shape."""

    build: Callable[[Mapping[str, torch.Tensor]], nn.Module]
    example: Callable[[nn.Module, int], torch.Tensor]


def _sizing_shape(state: Mapping[str, torch.Tensor], name: str, dims: int, arch: str) -> tuple[int, ...]:
    """The shape of state[name], a dims-D tensor from which the built-in architecture arch is sized."""
    if name not in state:
        raise ValueError(f"state dict: no tensor {name!r}, which the {arch} architecture is sized from; are these "
                         f"{arch} weights?")
    shape = tuple(state[name].shape)
    if len(shape) != dims:
        raise ValueError(f"state dict: {name!r} has shape {shape}, the {arch} architecture expects {dims} dims")
    return shape


def _build_digits(state: Mapping[str, torch.Tensor]) -> nn.Module:
    from slimrate.models.mlp import DigitsMLP

    hidden, _ = _sizing_shape(state, "0.weight", 2, "digits")
    return DigitsMLP(hidden=hidden)


def _build_charlm(state: Mapping[str, torch.Tensor]) -> nn.Module:
    from slimrate.models.char_lm import CharLM, CharLMConfig

    vocab, d_model = _sizing_shape(state, "tok_emb.weight", 2, "charlm")
    context, _ = _sizing_shape(state, "pos_emb.weight", 2, "charlm")
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return CharLM(CharLMConfig(vocab_size=vocab, context=context, d_model=d_model, n_layers=layers))


def _check_state_fits(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor that model lacks, that state lacks, or that differs in shape."""
    expected = model.state_dict()
    arch = type(model).__name__
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(f"state dict: no tensor {missing[0]!r} ({len(missing)} of the {len(expected)} tensors of "
                         f"{arch} are missing); pass the architecture the weights were saved from")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise ValueError(f"state dict: tensor {unexpected[0]!r} is not in {arch} ({len(unexpected)} such); pass the "
                         "architecture the weights were saved from")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise ValueError(f"state dict: {name!r} has shape {tuple(state[name].shape)}, {arch} expects "
                             f"{tuple(tensor.shape)}; pass the architecture the weights were saved from")


MODELS: dict[str, ModelSpec] = {
    "digits": ModelSpec(_build_digits, lambda m, b: torch.randn(b, m[0].in_features)),
    "charlm": ModelSpec(_build_charlm, lambda m, b: torch.randint(0, m.cfg.vocab_size, (b, m.cfg.context))),
}


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a .slim file, a .safetensors file or a mapping (no pickle files)."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"path: {path} is not a file (expected a .slim or .safetensors file)")
    if path.suffix == ".slim":
        from slimrate.backslash import load_slim

        return load_slim(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    raise ValueError(f"path: expected a .slim or .safetensors file, got {path.name!r}; pickle checkpoints are not "
                     "read, convert them with safetensors.torch.save_file")


def load(path: str | os.PathLike | Mapping[str, torch.Tensor], *, model_factory: str | Callable[[], nn.Module],
         device: str | torch.device = "cpu", sparse: bool = True, min_sparsity: float = 0.5, batch_size: int = 1,
         measure: bool = True) -> nn.Module:
    """Decode ``path`` into the module ``model_factory`` builds, in eval mode on ``device``.

    model_factory: a name in MODELS ("digits", "charlm": sized from the weights) or a callable returning the
    module.  sparse: swap nn.Linear layers that are ≥ min_sparsity zeros for SparseLinear where that is faster
    at ``batch_size`` (slimrate.sparse.sparsify; its decisions are kept as ``model.sparsify_decisions``).
    Raises ValueError naming the tensor when the weights do not fit the module (missing, extra, other shape).
    """
    state = read_state_dict(path)
    if isinstance(model_factory, str):
        if model_factory not in MODELS:
            raise ValueError(f"model_factory: expected one of {sorted(MODELS)} or a callable, got {model_factory!r}")
        model = MODELS[model_factory].build(state)
    elif callable(model_factory):
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_factory: must return an nn.Module, returned {type(model).__name__}")
    else:
        raise TypeError(f"model_factory: expected a name in {sorted(MODELS)} or a callable, "
                        f"got {type(model_factory).__name__}")
    _check_state_fits(model, state)
    model.load_state_dict(state)
    model.to(device).eval()
    model.sparsify_decisions = (
        sparsify(model, min_sparsity, batch_size=batch_size, measure=measure) if sparse else [])
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once (tied weights too)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def latency_us(model: nn.Module, example: torch.Tensor, repeats: int = 50) -> float:
    """Median forward latency of model(example) in microseconds (no grad)."""
    return median_us(model, example, repeats)


__all__ = ["MODELS", "ModelSpec", "latency_us", "load", "read_state_dict", "weight_bytes"]

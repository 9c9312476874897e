"""Compressed-inference runtime for embedding: load a .slim (or safetensors / state-dict) model, dense or
sparse, and measure its latency and weight memory.

    model = slimrate.runtime.load("model.slim", model_factory="digits")         # built-in architecture
    model = slimrate.runtime.load("model.slim", model_factory="hf:llama-folder") # transformers, from config.json
    model = slimrate.runtime.load("model.slim", model_factory=lambda: MyNet())   # any nn.Module

The weights stream in one tensor at a time (load_state_into), so a model built on the meta device ("hf:DIR"
models are) never holds a second copy of itself. A .slim file whose index declares more decoded bytes than
``max_bytes`` (default max(1 GiB, 256 × the file's size); docs/slim-format.md §9) is refused before anything is
decoded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimrate.backslash.slim_file import SlimFile, check_max_bytes
from slimrate.models.loading import load_state_into
from slimrate.runtime.hf import build_hf_model, hf_config_dir, hf_example, is_hf_factory
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


MODELS: dict[str, ModelSpec] = {
    "digits": ModelSpec(_build_digits, lambda m, b: torch.randn(b, m[0].in_features)),
    "charlm": ModelSpec(_build_charlm, lambda m, b: torch.randint(0, m.cfg.vocab_size, (b, m.cfg.context))),
}


def _checked_path(source: object) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir() or path.suffix == ".safetensors":
        return path  # checked by slimrate.checkpoints, which reads it
    if not path.is_file():
        raise ValueError(f"path: {path} is not a file (expected a .slim or .safetensors file, or a model folder)")
    if path.suffix != ".slim":
        raise ValueError(f"path: expected a .slim or .safetensors file or a model folder, got {path.name!r}; pickle "
                         "checkpoints are not read, convert them with safetensors.torch.save_file")
    return path


def _slim_tensors(file: SlimFile) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of an open .slim file, each decoded when it is asked for; the file is closed after the last."""
    with file:
        for name in file.keys():
            yield name, file.get_tensor(name)


def read_tensors(source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                 max_bytes: float | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a .slim file, a .safetensors file or model folder (sharded or not:
    slimrate.checkpoints) or a mapping (no pickle files), one tensor at a time; the path and a .slim file's index
    are checked now, the tensors read as the pairs are consumed.

    max_bytes: the most bytes a .slim file's tensors may decode to (SlimFile; None: max(1 GiB, 256 × the file's
    size), math.inf: no limit); safetensors tensors are the file's own bytes, so no such limit applies to them."""
    check_max_bytes(max_bytes)
    if isinstance(source, Mapping):
        return iter(source.items())
    path = _checked_path(source)
    if path.suffix == ".slim":
        return _slim_tensors(SlimFile(path, max_bytes=max_bytes))
    from slimrate.checkpoints import checkpoint_files, iter_checkpoint

    checkpoint_files(path)  # a missing or damaged checkpoint fails here, not at the first tensor
    return iter_checkpoint(path)


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                    max_bytes: float | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a .slim file, a .safetensors file or folder, or a mapping (no pickle files); max_bytes
    as in read_tensors."""
    return dict(read_tensors(source, max_bytes=max_bytes))


def _build(source, model_factory, max_bytes) -> tuple[nn.Module, Iterator[tuple[str, torch.Tensor]]]:
    """The module model_factory builds, and the (name, tensor) pairs of source to load into it."""
    if is_hf_factory(model_factory):
        folder = hf_config_dir(model_factory)
        tensors = read_tensors(source, max_bytes=max_bytes)
        return build_hf_model(folder), tensors
    if isinstance(model_factory, str):
        if model_factory not in MODELS:
            raise ValueError(f"model_factory: expected one of {sorted(MODELS)}, hf:CONFIG_DIR or a callable, got "
                             f"{model_factory!r}")
        state = read_state_dict(source, max_bytes=max_bytes)  # the built-ins are sized from the weights
        return MODELS[model_factory].build(state), iter(state.items())
    if not callable(model_factory):
        raise TypeError(f"model_factory: expected a name in {sorted(MODELS)}, hf:CONFIG_DIR or a callable, "
                        f"got {type(model_factory).__name__}")
    tensors = read_tensors(source, max_bytes=max_bytes)
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory: must return an nn.Module, returned {type(model).__name__}")
    return model, tensors


def load(path: str | os.PathLike | Mapping[str, torch.Tensor], *, model_factory: str | Callable[[], nn.Module],
         device: str | torch.device = "cpu", sparse: bool = True, min_sparsity: float = 0.5, batch_size: int = 1,
         measure: bool = True, max_bytes: float | None = None) -> nn.Module:
    """Decode ``path`` into the module ``model_factory`` builds, in eval mode on ``device``.

    path: a .slim or .safetensors file, or a state dict.
    model_factory: a name in MODELS ("digits", "charlm": sized from the weights), "hf:CONFIG_DIR" (any
    transformers causal LM, built on the meta device from CONFIG_DIR/config.json; its weights keep the
    checkpoint's dtype) or a callable returning the module (on the meta device or not).  The weights are loaded
    with load_state_into (strict).  sparse: swap nn.Linear layers that are ≥ min_sparsity zeros for
    SparseLinear where that is faster at ``batch_size`` (slimrate.sparse.sparsify; its decisions are kept as
    ``model.sparsify_decisions``).  max_bytes: the most bytes a .slim file's tensors may decode to, checked
    before anything is decoded (None: max(1 GiB, 256 × the file's size); math.inf: no limit).
    Raises ValueError naming the tensor when the weights do not fit the module (missing, extra, other shape), and
    SlimFormatError (a ValueError) naming the file when a .slim file is corrupt or declares more than max_bytes.
    """
    model, tensors = _build(path, model_factory, max_bytes)
    load_state_into(model, tensors)
    model.to(device).eval()
    model.sparsify_decisions = (
        sparsify(model, min_sparsity, batch_size=batch_size, measure=measure) if sparse else [])
    return model


def example_input(model_factory: str, model: nn.Module, batch: int) -> torch.Tensor:
    """A random input of ``batch`` rows for ``model``, built by the factory name ``model_factory``:
    MODELS[name].example, or for "hf:DIR" token ids of the model's vocabulary, int64 (batch, 16)."""
    if is_hf_factory(model_factory):
        return hf_example(model, batch)
    if model_factory not in MODELS:
        raise ValueError(f"model_factory: expected one of {sorted(MODELS)} or hf:CONFIG_DIR, got {model_factory!r}")
    return MODELS[model_factory].example(model, batch)


def output_tensor(output: object) -> torch.Tensor:
    """The tensor of a forward's result: a transformers model output's ``.logits``, else the result itself."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output


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


__all__ = ["MODELS", "ModelSpec", "example_input", "latency_us", "load", "load_state_into", "output_tensor",
           "read_state_dict", "read_tensors", "weight_bytes"]

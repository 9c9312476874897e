"""Loading a .slim file into an existing module one tensor at a time, so that a model built on the meta device
(no memory) loads with peak memory ≈ the model's own size plus one decoded tensor."""

from __future__ import annotations

import os

import torch
from torch import nn

from slimrate.backslash.slim_coding import RAW_DTYPES
from slimrate.backslash.slim_file import SlimFile

MAX_LISTED = 10  # names shown in a key error; the count gives the rest


def _state_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """state-dict name → (owning module, attribute, tensor) for every parameter and persistent buffer, tied
    ones (one object under several names) and shared modules under each of their names, as state_dict()."""
    slots = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        persistent_buffers = [(attr, t) for attr, t in module._buffers.items()
                              if attr not in module._non_persistent_buffers_set]
        for attr, t in [*module._parameters.items(), *persistent_buffers]:
            if t is not None:
                slots[f"{prefix}.{attr}" if prefix else attr] = (module, attr, t)
    return slots


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{names[:MAX_LISTED]}{more}"


def _check_fits(name: str, info: dict, target: torch.Tensor) -> None:
    """Same shape; the same dtype or both floating point (the value is then converted)."""
    if tuple(target.shape) != info["shape"]:
        raise ValueError(f"tensor {name!r}: shape {list(info['shape'])} in the file, {list(target.shape)} in the "
                         f"model; build the model with the configuration the file was saved from")
    stored = RAW_DTYPES[info["dtype"]]
    if stored != target.dtype and not (stored.is_floating_point and target.dtype.is_floating_point):
        raise ValueError(f"tensor {name!r}: dtype {info['dtype']} in the file, {target.dtype} in the model; only "
                         f"float dtypes are converted, build the model with {info['dtype']} here")


def load_slim_into(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Decode a .slim file one tensor at a time into ``model``'s parameters and persistent buffers; returns model.

    A parameter or buffer on the meta device is replaced by the decoded tensor (``load_state_dict(assign=True)``
    semantics: the file's dtype, on the CPU; a parameter keeps its requires_grad); any other is copied into in
    place (converted to its dtype and device). Tied parameters (one object under several names) are decoded
    once and stay tied; a name whose tied twin is in the file is not missing.
    strict: names of the model missing from the file, or in the file but not the model, raise ValueError listing
    them, before anything is loaded; strict=False loads the names both have (the others keep their values).
    Shapes, and dtypes other than float → float, must match (ValueError naming the tensor), also checked first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    slots = _state_slots(model)
    twins: dict[int, list[str]] = {}  # id of a parameter/buffer object → its names
    for name, (_, _, t) in slots.items():
        twins.setdefault(id(t), []).append(name)
    with SlimFile(path) as f:
        names = [name for name in f.keys() if name in slots]
        if strict:
            in_file = {id(slots[name][2]) for name in names}
            missing = [name for name, (_, _, t) in slots.items() if id(t) not in in_file]
            unexpected = [name for name in f.keys() if name not in slots]
            if missing or unexpected:
                raise ValueError(f"load_slim_into: {path} does not match the model: missing from the file "
                                 f"{_listed(missing)}, not in the model {_listed(unexpected)}; pass strict=False "
                                 f"to load the tensors both have")
        for name in names:
            _check_fits(name, f.info(name), slots[name][2])
        loaded = set()
        for name in names:
            target = slots[name][2]
            if id(target) in loaded:
                continue
            value = f.get_tensor(name)
            if target.is_meta:
                if isinstance(target, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=target.requires_grad)
                for twin in twins[id(target)]:
                    module, attr, _ = slots[twin]
                    setattr(module, attr, value)
            else:
                with torch.no_grad():
                    target.copy_(value)
            loaded.add(id(target))
    return model

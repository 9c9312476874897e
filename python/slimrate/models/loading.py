"""load_state_into: stream (name, tensor) pairs into a module's parameters and buffers, one tensor at a time,
so that a model built on the meta device loads with peak memory ≈ its own size plus one tensor."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch
from torch import nn

MAX_LISTED = 10  # names an error message lists; it says how many more there are


@dataclass(frozen=True)
class Slot:
    """Where a state-dict name lives: ``module._parameters[attr]`` or ``module._buffers[attr]``."""

    module: nn.Module
    attr: str
    is_parameter: bool

    @property
    def tensor(self) -> torch.Tensor:
        return (self.module._parameters if self.is_parameter else self.module._buffers)[self.attr]

    def set(self, tensor: torch.Tensor) -> None:
        (self.module._parameters if self.is_parameter else self.module._buffers)[self.attr] = tensor


def state_slots(model: nn.Module) -> dict[str, Slot]:
    """Every name of ``model.state_dict()`` that is a parameter or a persistent buffer, tied names included."""
    slots = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for attr, p in module._parameters.items():
            if p is not None:
                slots[dot + attr] = Slot(module, attr, True)
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                slots[dot + attr] = Slot(module, attr, False)
    return slots


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{names[:MAX_LISTED]}{more}"


def _init_hook(model: nn.Module, module_name: str):
    """``_init_weights`` of the nearest module enclosing ``module_name`` (itself included) that has one: the hook
    of transformers' PreTrainedModel, which its from_pretrained runs to fill the buffers no checkpoint holds."""
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:depth])), "_init_weights", None)
        if callable(hook):
            return hook
    return None


def _run_init_hook(module: nn.Module, metas: dict[str, torch.Tensor], hook, device: torch.device) -> set[str]:
    """hook(module) with the buffers ``metas`` (attr → meta tensor) given storage on ``device``; returns the attrs
    it recomputed: wrote into (an in-place write bumps a tensor's version counter) or replaced."""
    placeholders = {attr: torch.empty_like(b, device=device) for attr, b in metas.items()}
    module._buffers.update(placeholders)
    with torch.no_grad():
        hook(module)
    return {attr for attr, p in placeholders.items() if module._buffers[attr] is not p or p._version > 0}


def recompute_derived_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Give the non-persistent buffers that are on the meta device storage on ``device`` and have the model
    recompute them; returns the names of those it did not recompute (they stay on meta).

    Such buffers are derived from the configuration, never saved (rotary ``inv_freq``, position ids). A module's
    constructor computes them, but under ``torch.device("meta")`` only their shape is kept. transformers models
    recompute them in ``_init_weights(module)``, as their from_pretrained does; it is called here on each module
    that owns such a buffer, before any weight is loaded (so its writes to still-empty parameters are lost, as
    they should be)."""
    left = []
    for module_name, module in list(model.named_modules()):
        metas = {attr: b for attr, b in module._buffers.items()
                 if b is not None and b.is_meta and attr in module._non_persistent_buffers_set}
        if not metas:
            continue
        hook = _init_hook(model, module_name)
        recomputed = _run_init_hook(module, metas, hook, device) if hook is not None else set()
        for attr, meta in metas.items():
            if attr not in recomputed:
                module._buffers[attr] = meta  # back on meta rather than left as uninitialised memory
                left.append(f"{module_name}.{attr}" if module_name else attr)
    return left


def _pair(item: object) -> tuple[str, torch.Tensor]:
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)):
        got = (f"({', '.join(type(x).__name__ for x in item)})" if isinstance(item, tuple)
               else type(item).__name__)
        raise TypeError(f"items: expected (str, Tensor) pairs, got {got}")
    return item


def load_state_into(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]], *, strict: bool = True,
                    names: Collection[str] | None = None) -> nn.Module:
    """Load (name, tensor) pairs into ``model``'s parameters and persistent buffers, consuming one pair at a time.

    A parameter or buffer on the meta device is replaced by the tensor (assign semantics, as
    ``load_state_dict(assign=True)``: the tensor's dtype and device are kept, a parameter keeps its
    requires_grad); any other is copied into in place (converted to its dtype). Tied parameters (one tensor
    under several names, e.g. tie_word_embeddings) stay one tensor: replaced once for all their names, and a
    name whose twin was loaded is not missing. First, non-persistent buffers on the meta device are recomputed
    by the model on the device of the first tensor (``recompute_derived_buffers``).
    strict: names the model does not have, and parameters, buffers or derived buffers left unloaded, raise a
    ValueError listing them once every pair is consumed; strict=False leaves those as they were (on meta if
    they were there). names: the names ``items`` will yield, where known in advance (a file's index): strict then
    checks them before anything is loaded. A tensor of another shape, or float where the model's is not (or the
    reverse), raises a ValueError naming it at once. Parameters and buffers only: module load hooks and extra
    state are not run. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {type(strict).__name__}")
    arch = type(model).__name__
    slots = state_slots(model)
    tied: dict[int, list[Slot]] = {}  # id of the tensor at the start → every slot holding it
    for slot in slots.values():
        tied.setdefault(id(slot.tensor), []).append(slot)
    group = {name: id(slot.tensor) for name, slot in slots.items()}
    if strict and names is not None:  # the names alone, before anything is loaded (buffers are checked after)
        _check_keys(arch, slots, group, {group[n] for n in names if n in slots}, [n for n in names if n not in slots],
                    [])
    pairs = iter(items)
    first = next(pairs, None)
    if first is not None:
        first = _pair(first)
    not_recomputed = recompute_derived_buffers(model, first[1].device if first else torch.device("cpu"))
    loaded, unexpected = set(), []
    for name, value in map(_pair, itertools.chain([first] if first else [], pairs)):
        if name not in slots:
            unexpected.append(name)
            continue
        current = slots[name].tensor
        if value.shape != current.shape:
            raise ValueError(f"state dict: {name!r} has shape {tuple(value.shape)}, {arch} expects "
                             f"{tuple(current.shape)}; pass the weights this model was saved with")
        if value.is_floating_point() != current.is_floating_point():
            raise ValueError(f"state dict: {name!r} is {value.dtype}, {arch} expects {current.dtype}; pass the "
                             "weights this model was saved with")
        if current.is_meta:
            new = value.detach()
            if slots[name].is_parameter:
                new = nn.Parameter(new, requires_grad=current.requires_grad)
            for slot in tied[group[name]]:
                slot.set(new)
        else:
            with torch.no_grad():
                current.copy_(value)
        loaded.add(group[name])
    if strict:
        _check_keys(arch, slots, group, loaded, unexpected, not_recomputed)
    return model


def _check_keys(arch: str, slots: dict[str, Slot], group: dict[str, int], loaded: set[int], unexpected: list[str],
                not_recomputed: list[str]) -> None:
    """ValueError listing the model's tensors not in ``loaded`` (ids of tensor groups), the names it does not
    have, and derived buffers left on the meta device; nothing when there are none."""
    missing = [name for name in slots if group[name] not in loaded]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of its {len(slots)} tensors: {_listed(missing)}")
    if unexpected:
        problems.append(f"tensors it does not have: {_listed(unexpected)}")
    if not_recomputed:
        problems.append(f"buffers no checkpoint holds, on the meta device, that it does not recompute: "
                        f"{_listed(not_recomputed)} (create them on a real device)")
    if problems:
        raise ValueError(f"state dict: does not fit {arch}: {'; '.join(problems)}; pass the weights this model was "
                         "saved with")

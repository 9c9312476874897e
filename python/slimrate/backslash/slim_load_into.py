"""Loading a .slim file into an existing module one tensor at a time, so that a model built on the meta device
(no memory) loads with peak memory ≈ the model's own size plus one decoded tensor."""

from __future__ import annotations

import os

from torch import nn

from slimrate.backslash.slim_file import SlimFile
from slimrate.models.loading import load_state_into


def load_slim_into(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                   max_bytes: float | None = None) -> nn.Module:
    """Decode a .slim file one tensor at a time into ``model``'s parameters and persistent buffers; returns model.

    The rules are ``slimrate.models.loading.load_state_into``'s: a parameter or buffer on the meta device is
    replaced by the decoded tensor (the file's dtype, on the CPU; a parameter keeps its requires_grad), any other
    is copied into in place (a float value converted to its dtype); tied parameters stay tied and a name whose
    tied twin is in the file is not missing; derived buffers on the meta device (rotary ``inv_freq``) are
    recomputed by the model. strict: missing or unexpected names raise a ValueError listing them, before anything
    is loaded; a tensor of another shape, or float against non-float, raises naming it. max_bytes: SlimFile's
    limit on the bytes the file's tensors may decode to (None: max(1 GiB, 256 × the file's size)).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    with SlimFile(path, max_bytes=max_bytes) as f:
        names = f.keys()
        return load_state_into(model, ((name, f.get_tensor(name)) for name in names), strict=strict, names=names)

"""The device a run trains on, checked before any work: "cpu", "cuda" (the current CUDA device) or "cuda:N"."""

from __future__ import annotations

import torch

DEVICE_FORMS = "'cpu', 'cuda' or 'cuda:N'"


def check_device(device: str, name: str = "device") -> torch.device:
    """``device`` as a torch.device; ValueError naming ``name`` when it is not one of DEVICE_FORMS, or names a
    CUDA device this process cannot see (no CUDA, or an index past the last GPU)."""
    if not isinstance(device, str):
        raise TypeError(f"{name}: expected a string, {DEVICE_FORMS}, got {type(device).__name__} {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index is not None):
        raise ValueError(f"{name}: expected {DEVICE_FORMS}, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r} needs a CUDA GPU, and this process has none (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); pass 'cpu' or run on a machine "
                             "with a GPU")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{name}: {device!r} is past the last GPU ({count} visible: cuda:0..cuda:{count - 1}); "
                             "pass one of those")
    return parsed

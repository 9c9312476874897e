"""Argument checks shared by the op faces: each raises TypeError/ValueError naming the argument,
what was expected, what was got, and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def float_tensor_list(name: str, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as a list of float16/bfloat16/float32/float64 tensors on one device, detached."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Iterable):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}; wrap a single "
                        f"tensor as [t]")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}]: expected a float dtype (float32, float64, bfloat16, float16), "
                            f"got {t.dtype}; pass floating-point weights")
        if t.device != out[0].device:
            raise ValueError(f"{name}[{i}]: all tensors must be on one device, got {t.device} and "
                             f"{out[0].device} ({name}[0]); move them with .to(device)")
    return [t.detach() for t in out]


def finite_number(name: str, value: float, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a Python float, finite, optionally > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a value > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {value}")
    return value

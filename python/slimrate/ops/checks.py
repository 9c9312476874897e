"""Argument checks shared by the op faces: each raises TypeError/ValueError naming the argument,
what was expected, what was got, and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """The dtypes as a message lists them: "float32, bfloat16 or float16"."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | str | None = None,
                 shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """``t`` checked to be a tensor with a dtype in ``dtypes``, on ``device``, of ``shape`` (a None entry
    accepts any size in that dimension); each left out is not checked.  Returns ``t``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected {dtype_names(dtypes)}, got {t.dtype}; convert with .to({dtypes[0]})")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}; move it with "
                         f".to('{device}')")
    if shape is not None and (t.dim() != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, t.shape, strict=True))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
        raise ValueError(f"{name}: expected a {len(shape)}-D tensor of shape {want}, got shape {tuple(t.shape)}")
    return t


def check_bias(bias: object, out_features: int, device: torch.device) -> torch.Tensor | None:
    """``bias``: None or a float tensor [out_features] on ``device``."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias: expected a float tensor or None, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if bias.shape != (out_features,) or bias.device != device:
        raise ValueError(f"bias: expected shape ({out_features},) on {device}, got {tuple(bias.shape)} on "
                         f"{bias.device}")
    return bias


def int_arg(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int in [lo, hi] (hi None: no upper bound); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {bounds}, got {value}")
    return value


def bool_arg(name: str, value: object) -> bool:
    """``value`` checked to be a Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


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


def memory_span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses [start, end) spanned by ``t``'s elements (torch strides are >= 0); start == end when empty."""
    start = t.data_ptr()
    if t.is_contiguous():  # the common case, without a Python loop over the dims
        return start, start + t.nbytes
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def check_separate_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Refuse grads that share memory with another grad or with a param other than their own.

    params[i] and grads[i]: same shape and dtype (checked before).  grads are written in place one after
    another, so a grad that overlaps another grad (or is listed twice) would get two updates or corrupt its
    neighbour, and one that overlaps params[j] would change θ before (or after) params[j] is read.  grads[i]
    may be params[i] itself (the same elements: an in-place update of θ).  Overlap is judged on the address
    spans [first element, last element] of each tensor, so two interleaved views of one buffer count as
    overlapping.  One sort, O(n log n) in the number of tensors (a few µs per tensor); skipped on the meta
    device and while torch.compile traces (fake tensors have no memory).
    """
    if not grads or grads[0].device.type == "meta" or torch.compiler.is_compiling():
        return
    spans = []  # (start, end, kind, index) of every nonempty tensor
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        g_span, p_span = memory_span(g), memory_span(p)
        spans.append((*g_span, "grads", i))
        if p_span != g_span or p.stride() != g.stride():  # else grads[i] is params[i] itself
            spans.append((*p_span, "params", i))
    # Sweep in order of start: a span overlaps an earlier one iff it starts before the furthest end so far.
    # Params only conflict with grads (reading one buffer twice is harmless).
    furthest = {"grads": (0, -1), "params": (0, -1)}  # kind -> (end, index) of the span reaching furthest
    for start, end, kind, i in sorted(s for s in spans if s[0] < s[1]):
        for other in ("grads", "params") if kind == "grads" else ("grads",):
            reach, j = furthest[other]
            if start < reach:
                (_, a_kind, a), (_, b_kind, b) = sorted([(other == "params", other, j), (kind == "params", kind, i)])
                raise ValueError(
                    f"{a_kind}[{a}] and {b_kind}[{b}]: share memory; each gradient is updated in place, so it "
                    "must have memory of its own (a tensor listed twice would be updated twice), except that "
                    "grads[i] may be params[i] itself; pass separate tensors, e.g. a .clone()")
        furthest[kind] = max(furthest[kind], (end, i))


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

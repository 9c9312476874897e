"""SparseLinear (an nn.Linear with block-sparse weights) and sparsify (swap layers where sparse is faster)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from slimrate.ops.sparse import sparse_linear, sparse_linear_unchecked
from slimrate.ops.sparse_format import SparseMatrix, block_arg

FORMATS = {"csr": (1, 1), "bsr": (4, 4)}  # format -> default block


class SparseLinear(nn.Module):
    """y = x·Wᵀ + b like nn.Linear(in_features, out_features), W stored as a SparseMatrix; inference only.

    The matrix lives in buffers (row_ptr, col_idx, values, bias), so .to(), state_dict() and
    load_state_dict() work; the logical shape travels as extra state.
    """

    def __init__(self, weight: SparseMatrix, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, SparseMatrix):
            raise TypeError(f"weight: expected a SparseMatrix, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("row_ptr", weight.row_ptr)
        self.register_buffer("col_idx", weight.col_idx)
        self.register_buffer("values", weight.values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "csr", block: tuple[int, int] | None = None,
                    dtype: torch.dtype | None = None) -> SparseLinear:
        """Keep the nonzero blocks of ``linear.weight``: format "csr" (1×1 blocks) or "bsr" (``block``,
        default (4, 4)); ``dtype`` converts the stored values (default: the weight's dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if format not in FORMATS:
            raise ValueError(f"format: expected one of {tuple(FORMATS)}, got {format!r}")
        if format == "csr" and block not in (None, (1, 1)):
            raise ValueError(f"block: format='csr' stores 1×1 blocks, got {block!r}; use format='bsr'")
        block = block_arg(block if block is not None else FORMATS[format])
        weight = linear.weight.detach() if dtype is None else linear.weight.detach().to(dtype)
        return cls(SparseMatrix.from_dense(weight, block), linear.bias)

    @property
    def weight(self) -> SparseMatrix:
        return SparseMatrix(self.row_ptr, self.col_idx, self.values, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The buffers are consistent by construction: check only x, then skip the op face's checks
        # (they cost about as much as a small layer's kernel).
        if x.dim() == 0 or x.shape[-1] != self.in_features or x.device != self.values.device:
            return sparse_linear(x, self.weight, self.bias)  # raises the face's clear error
        return sparse_linear_unchecked(x, self.row_ptr, self.col_idx, self.values, self.out_features, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The incoming matrix is checked as a SparseMatrix (indices, order) before anything is copied.
        parts = {name: state_dict.get(prefix + name) for name in ("row_ptr", "col_idx", "values")}
        if all(isinstance(t, torch.Tensor) for t in parts.values()):
            extra = state_dict.get(prefix + "_extra_state", self.get_extra_state())
            shape = extra.get("shape") if isinstance(extra, dict) else None
            SparseMatrix(**parts, shape=tuple(shape) if isinstance(shape, list) else shape)
        # The stored sizes depend on the weights' zeros: take the incoming shapes, then copy as usual.
        for name in ("row_ptr", "col_idx", "values", "bias"):
            incoming = state_dict.get(prefix + name)
            current = self._buffers[name]
            if isinstance(incoming, torch.Tensor) and (current is None or current.shape != incoming.shape):
                self._buffers[name] = torch.empty_like(incoming, device=self.values.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict:
        return {"shape": [self.out_features, self.in_features]}

    def set_extra_state(self, state: dict) -> None:
        self.out_features, self.in_features = (int(n) for n in state["shape"])

    def extra_repr(self) -> str:
        weight = self.weight  # checked when made: once
        r, c = weight.block
        return (f"in_features={self.in_features}, out_features={self.out_features}, block=({r}, {c}), "
                f"density={weight.density:.3f}, bias={self.bias is not None}")


@dataclass
class SparsifyDecision:
    """What sparsify did with one nn.Linear; times are medians in microseconds (None when not measured)."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    dense_us: float | None
    sparse_us: float | None
    replaced: bool


def median_us(fn, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of fn(x) in microseconds over ``repeats`` calls after two warm-up calls."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            fn(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            if i >= 2:
                times.append(1e6 * (time.perf_counter() - start))
    return statistics.median(times)


def sparsify(model: nn.Module, min_sparsity: float = 0.5, *, batch_size: int = 1, format: str = "csr",
             block: tuple[int, int] | None = None, measure: bool = True, repeats: int = 20) -> list[SparsifyDecision]:
    """Replace, in place, each nn.Linear whose weight is at least ``min_sparsity`` zeros by a SparseLinear.

    With ``measure`` (default) a layer is replaced only where the sparse kernel beats F.linear on this
    machine for an input of [batch_size, in_features] (medians of ``repeats`` timed calls): the measured
    crossover for that layer's shape and sparsity.  Returns one decision per nn.Linear, in module order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("model: is itself an nn.Linear; use SparseLinear.from_linear(model) instead")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"min_sparsity: expected a number in [0, 1], got {min_sparsity!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    decisions = []
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        w = linear.weight.detach()
        sparsity = float((w == 0).sum()) / max(1, w.numel())
        decision = SparsifyDecision(name, tuple(w.shape), sparsity, None, None, False)
        decisions.append(decision)
        if sparsity < min_sparsity:
            continue
        sparse = SparseLinear.from_linear(linear, format=format, block=block)
        if measure:
            x = torch.randn(batch_size, linear.in_features, dtype=w.dtype, device=w.device)
            decision.dense_us = median_us(linear, x, repeats)
            decision.sparse_us = median_us(sparse, x, repeats)
            if decision.sparse_us >= decision.dense_us:
                continue
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], sparse)
        decision.replaced = True
    return decisions


def format_decisions(decisions: list[SparsifyDecision]) -> str:
    """A small text table of sparsify's decisions."""
    width = max([28, *(len(d.name) for d in decisions)])  # transformers' layer names run to ~40 characters
    lines = [f"{'layer':<{width}} {'shape':>12} {'sparsity':>8} {'dense µs':>9} {'sparse µs':>9}  sparse?"]
    for d in decisions:
        dense = f"{d.dense_us:9.1f}" if d.dense_us is not None else f"{'-':>9}"
        sp = f"{d.sparse_us:9.1f}" if d.sparse_us is not None else f"{'-':>9}"
        lines.append(f"{d.name:<{width}} {str(d.shape[0]) + 'x' + str(d.shape[1]):>12} {d.sparsity:8.1%} {dense} {sp}  "
                     f"{'yes' if d.replaced else 'no'}")
    return "\n".join(lines)

"""Magnitude pruning of a model's weights in place, and a per-layer sparsity report.

Three patterns, all by magnitude:
- ``"unstructured"``: zero the smallest |w| entries;
- ``"block"``: cut each weight [out, in] into (r, c) blocks and zero the blocks with the smallest mean
  square, for the block-sparse (BSR) kernels;
- ``"n:m"``: in every group of m consecutive weights along the input dimension keep the n largest |w|
  (2:4 is what semi-structured sparse tensor cores run).

Counts are exact: a share s of N units (entries or blocks) prunes exactly ``round(s·N)`` of them (Python's
``round``, half to even); ties in magnitude are broken by position, the earlier unit pruned first
(module order, then row-major order), never by a ``<=`` threshold that would prune every tie.

Weights with more than 2 dims (e.g. a conv weight chosen with ``include``) are pruned as their
[shape[0], prod(shape[1:])] view, the GEMM view of the layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCOPES = ("global", "layer")
PATTERNS = ("unstructured", "block", "n:m")

ParamFilter = Callable[[str, nn.Parameter], bool]


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros of one weight: ``sparsity`` = zeros / numel (0.0 for an empty weight)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    sparsity: float


def prune_(module: nn.Module, sparsity: float | None, scope: str = "global", pattern: str = "unstructured",
           block: tuple[int, int] = (1, 4), n_m: tuple[int, int] = (2, 4),
           include: ParamFilter | None = None) -> list[LayerSparsity]:
    """Zero the smallest-magnitude weights of ``module`` in place; returns ``sparsity_report(module, include)``.

    module: any ``nn.Module``; by default the weight of every ``nn.Linear`` in it is pruned (biases never).
    include: ``(qualified_name, param) -> bool`` choosing the weights instead (e.g. ``"fc1.weight"``); each
        chosen parameter needs ≥ 2 dims; a tied parameter is pruned once.
    sparsity: the share in [0, 1] of units to zero (0 prunes nothing, 1 everything). For ``pattern="n:m"``
        it must be None or the implied 1 − n/m.
    scope: ``"global"`` ranks the units of all chosen weights together (one threshold for the model, so layers
        of small weights lose more), ``"layer"`` prunes each weight to ``sparsity`` on its own. Ignored by n:m.
    pattern:
        ``"unstructured"``: units are entries, ranked by |w|; exactly round(s·numel) per layer (``"layer"``)
            or round(s·total) over all chosen weights (``"global"``).
        ``"block"``: units are the (r, c) = ``block`` blocks of the [out, in] weight, ranked by the mean of w²
            over the block's real elements: edge blocks of an out/in that is not a multiple of r/c are
            partial, and a mean (not an L2 norm) lets them compete with full blocks on equal terms. The
            share counts blocks, not elements, in both scopes (so a pruned partial block counts as one block).
        ``"n:m"``: in every group of m consecutive weights along the input (last) dim, the m − n smallest |w|
            are zeroed. When in % m = L ≠ 0 the last group of each row keeps ceil(n·L/m) of its L weights: the
            same share rounded up, so it still has ≤ n nonzeros when zero-padded to m (a valid n:m layout).
    block: (r, c), positive ints; used by ``"block"``. n_m: (n, m), ints with 0 ≤ n ≤ m, m ≥ 1; used by ``"n:m"``.

    Weights that are already zero count as pruned: they have the smallest magnitude, so they are chosen
    first, and pruning to s a weight that is already more than s zero changes nothing (a weight 60% zero
    pruned to 50% under ``"layer"`` stays 60% zero; a block or group that is already all zero is pruned first).
    NaN weights rank as +inf (pruned last).

    float32/bfloat16/float16/float64 weights on any device; dtype, device, storage and ``requires_grad`` are
    kept (pruned entries are set to +0.0 under ``torch.no_grad``). Magnitudes are compared in float32
    (float64 when a weight is float64): exact for |w|, rounded for block means. ``"global"`` holds one score
    per unit of all chosen weights at once, on the first weight's device (4 bytes per unit in float32).
    Optimizer state is not touched: momentum can regrow pruned weights if training goes on.

    Raises TypeError if ``module`` is not an ``nn.Module``; ValueError naming the argument for a sparsity
    outside [0, 1] or NaN, an unknown scope or pattern, a bad block or n_m, a chosen weight with < 2 dims,
    or no chosen weights at all.
    """
    _check_module(module)
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: expected one of {', '.join(map(repr, PATTERNS))}, got {pattern!r}")
    r, c = _block_pair(block)
    n, m = _n_m_pair(n_m)
    share = _check_sparsity(sparsity, pattern, n, m)
    _, params = _chosen_weights(module, include)

    with torch.no_grad():
        if pattern == "n:m":
            for p in params:
                p.masked_fill_(_n_m_prune_mask(_matrix_view(p), n, m).view(p.shape), 0)
        else:
            unit = (r, c) if pattern == "block" else (1, 1)
            _prune_units_(params, unit, share, scope)
    return sparsity_report(module, include)


def sparsity_report(module: nn.Module, include: ParamFilter | None = None) -> list[LayerSparsity]:
    """The zeros of each weight ``prune_`` would choose (same ``include``), in module order.

    Counts exact zeros (+0.0 and -0.0) as they are now, whoever made them."""
    _check_module(module)
    names, params = _chosen_weights(module, include)
    report = []
    for name, p in zip(names, params, strict=True):
        zeros = int((p.detach() == 0).sum())
        report.append(LayerSparsity(name, tuple(p.shape), p.numel(), zeros, zeros / p.numel() if p.numel() else 0.0))
    return report


def format_sparsity_report(report: list[LayerSparsity]) -> str:
    """A text table of ``report``, one row per weight and a total row (zeros over all entries)."""
    numel = sum(layer.numel for layer in report)
    zeros = sum(layer.zeros for layer in report)
    header = ("weight", "shape", "params", "zeros", "sparsity")
    rows = [(layer.name, "x".join(map(str, layer.shape)), f"{layer.numel:,}", f"{layer.zeros:,}",
             f"{100 * layer.sparsity:.2f}%") for layer in report]
    total = ("total", "", f"{numel:,}", f"{zeros:,}", f"{100 * zeros / numel if numel else 0.0:.2f}%")
    widths = [max(len(row[i]) for row in (header, *rows, total)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:  # names and shapes left-aligned, numbers right-aligned
        cells = zip(row, widths, strict=True)
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows), rule, line(total)])


def _check_module(module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")


def _block_pair(block: object) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
        raise ValueError(f"block: expected a pair of positive ints (rows, cols) of each block, e.g. (1, 4), "
                         f"got {block!r}")
    return int(block[0]), int(block[1])


def _n_m_pair(n_m: object) -> tuple[int, int]:
    if (not isinstance(n_m, (tuple, list)) or len(n_m) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in n_m)
            or not 0 <= n_m[0] <= n_m[1] or n_m[1] < 1):
        raise ValueError(f"n_m: expected ints (n, m) with 0 <= n <= m and m >= 1 (keep n of every m), "
                         f"e.g. (2, 4), got {n_m!r}")
    return int(n_m[0]), int(n_m[1])


def _check_sparsity(sparsity: object, pattern: str, n: int, m: int) -> float:
    implied = 1 - n / m
    if sparsity is None and pattern == "n:m":
        return implied
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity: expected a number in [0, 1], got {type(sparsity).__name__}"
                        + ("; None is only accepted with pattern='n:m'" if sparsity is None else ""))
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"sparsity: expected a number in [0, 1], got {value}")
    if pattern == "n:m" and not math.isclose(value, implied, rel_tol=0.0, abs_tol=1e-9):
        raise ValueError(f"sparsity: n_m={n}:{m} implies sparsity {implied:g}, got {value:g}; pass "
                         f"sparsity={implied:g} or None")
    return value


def _chosen_weights(module: nn.Module, include: ParamFilter | None) -> tuple[list[str], list[nn.Parameter]]:
    """(qualified names, parameters) chosen by ``include`` (default: nn.Linear weights), each tied one once."""
    names: list[str] = []
    params: list[nn.Parameter] = []
    taken: set[int] = set()
    for module_name, sub in module.named_modules():
        for param_name, p in sub.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            keep = (isinstance(sub, nn.Linear) and param_name == "weight") if include is None else include(name, p)
            if not keep or id(p) in taken:
                continue
            if p.dim() < 2:
                raise ValueError(f"include: chose {name!r} of shape {tuple(p.shape)}; only weights with >= 2 dims "
                                 f"can be pruned, return False for it")
            taken.add(id(p))
            names.append(name)
            params.append(p)
    if not params:
        what = "no nn.Linear weights" if include is None else "include chose no parameters"
        raise ValueError(f"module: nothing to prune ({what}); pass include=lambda name, p: ... to choose weights")
    return names, params


def _matrix_view(p: torch.Tensor) -> torch.Tensor:
    """p as [shape[0], prod(shape[1:])] (the weight itself for nn.Linear)."""
    return p.detach().reshape(p.shape[0], math.prod(p.shape[1:]))


def _score_dtype(params: list[nn.Parameter]) -> torch.dtype:
    # float32 holds every bf16/fp16 value exactly, so |w| is ranked without rounding.
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _unit_scores(w: torch.Tensor, unit: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Flat scores of w [rows, cols]: |w| for (1, 1) units, else the mean of w² over each (r, c) block's
    real elements, [ceil(rows/r) · ceil(cols/c)] in row-major block order."""
    if unit == (1, 1):
        return w.abs().to(dtype).reshape(-1)
    r, c = unit
    rows, cols = w.shape
    brows, bcols = math.ceil(rows / r), math.ceil(cols / c)
    squares = F.pad(w.to(dtype).square(), (0, bcols * c - cols, 0, brows * r - rows))
    sums = squares.view(brows, r, bcols, c).sum(dim=(1, 3))                       # [brows, bcols]
    block_rows = (rows - r * torch.arange(brows, device=w.device)).clamp(max=r)   # real rows per block row
    block_cols = (cols - c * torch.arange(bcols, device=w.device)).clamp(max=c)
    return (sums / (block_rows[:, None] * block_cols[None, :])).reshape(-1)


def _units_to_entries(unit_mask: torch.Tensor, shape: tuple[int, int], unit: tuple[int, int]) -> torch.Tensor:
    """A flat per-block mask back to a [rows, cols] per-entry mask."""
    r, c = unit
    rows, cols = shape
    brows, bcols = math.ceil(rows / r), math.ceil(cols / c)
    blocks = unit_mask.view(brows, 1, bcols, 1).expand(brows, r, bcols, c)
    return blocks.reshape(brows * r, bcols * c)[:rows, :cols]


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest of flat ``scores``, ties taken in index order (k-th value + first ties)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.numel():
        return mask.fill_(True)
    scores = scores.nan_to_num(nan=math.inf)
    kth = torch.kthvalue(scores, k).values
    mask = scores < kth
    ties = (scores == kth).nonzero().squeeze(1)                                   # ascending indices
    mask[ties[: k - int(mask.sum())]] = True
    return mask


def _prune_units_(params: list[nn.Parameter], unit: tuple[int, int], share: float, scope: str) -> None:
    """Zero the ``share`` of (r, c) units with the smallest scores, per weight or over all weights."""
    dtype = _score_dtype(params)
    views = [_matrix_view(p) for p in params]
    scores = [_unit_scores(w, unit, dtype) for w in views]
    if scope == "layer":
        masks = [_smallest(s, round(share * s.numel())) for s in scores]
    else:
        pooled = torch.cat([s.to(scores[0].device) for s in scores])
        masks = _smallest(pooled, round(share * pooled.numel())).split([s.numel() for s in scores])
    for p, w, mask in zip(params, views, masks, strict=True):
        p.masked_fill_(_units_to_entries(mask.to(p.device), tuple(w.shape), unit).reshape(p.shape), 0)


def _smallest_along_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest along the last dim, ties taken in index order (stable sort)."""
    order = torch.argsort(scores, dim=-1, stable=True)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :k], True)


def _n_m_prune_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[rows, cols] mask of the entries n:m pruning zeros in w [rows, cols] (groups along cols)."""
    rows, cols = w.shape
    scores = w.abs().to(_score_dtype([w])).nan_to_num(nan=math.inf)
    full = cols - cols % m
    parts = [_smallest_along_rows(scores[:, :full].reshape(rows, full // m, m), m - n).reshape(rows, full)]
    tail = cols - full
    if tail:
        keep = -(-n * tail // m)                                                  # ceil(n·tail/m)
        parts.append(_smallest_along_rows(scores[:, full:], tail - keep))
    return torch.cat(parts, dim=1)

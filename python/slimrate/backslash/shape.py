"""Generalized-Gaussian shape ν by moment matching (docs/backslash.md §3).

For θ ~ GG(ν, α), p(θ) ∝ exp(−(|θ|/α)^ν), the scale-free ratio

    ρ(ν) = E[θ²] / E[|θ|]² = Γ(1/ν)·Γ(3/ν) / Γ(2/ν)²

is strictly decreasing in ν, from ∞ (ν → 0) to 4/3 (ν → ∞, the uniform limit); ρ(1) = 2 (Laplace),
ρ(2) = π/2 (Gaussian).  The estimate ν̂ solves ρ(ν̂) = ρ̂ = N·Σθ² / (Σ|θ|)² with the sums pooled over
all given tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from slimrate.ops import rate_stats
from slimrate.ops.checks import finite_number

# The authors' re-implementation inverts ρ on the grid ν ∈ [0.1, 3.0] and clamps outside it
# (docs/backslash.md §1, §3); we solve exactly inside the same range.  ρ(0.1) = 216.8 and
# ρ(3.0) = 1.461, so ρ̂ ≥ 216.8 gives 0.1 and ρ̂ ≤ 1.461 gives 3.0 (ρ̂ ≥ 1 always, by Cauchy–Schwarz).
NU_MIN = 0.1
NU_MAX = 3.0
# Bisection on log ν: 60 halvings of [log 0.1, log 3] (width 3.4) leave < 3e-18, below float64 spacing.
BISECTION_STEPS = 60


def log_moment_ratio(nu: float) -> float:
    """log ρ(ν) = lgamma(1/ν) + lgamma(3/ν) − 2·lgamma(2/ν), for ν > 0."""
    return math.lgamma(1.0 / nu) + math.lgamma(3.0 / nu) - 2.0 * math.lgamma(2.0 / nu)


def shape_from_moments(n: float, sum_abs: float, sum_sq: float) -> float:
    """ν̂ ∈ [0.1, 3] with ρ(ν̂) = n·sum_sq / sum_abs², by bisection on log ν.

    n: element count N; sum_abs: Σ|θ|; sum_sq: Σθ² (Python numbers, e.g. from ``ops.rate_stats``).
    Values of ρ̂ beyond ρ(0.1) = 216.8 or below ρ(3) = 1.461 clamp to 0.1 or 3 (see NU_MIN/NU_MAX).
    Raises ValueError when n = 0 or sum_abs = 0 (no data, or all zeros: the shape is undefined).
    """
    n = finite_number("n", n, nonnegative=True)
    sum_abs = finite_number("sum_abs", sum_abs, nonnegative=True)
    sum_sq = finite_number("sum_sq", sum_sq, nonnegative=True)
    if n == 0:
        raise ValueError("n: the shape of an empty set of values is undefined; pass at least one element")
    if sum_abs == 0:
        raise ValueError("sum_abs: all values are zero, so the generalized-Gaussian shape is undefined; "
                         "estimate it from non-zero weights")
    if sum_sq == 0:
        raise ValueError(f"sum_sq: is 0 while sum_abs = {sum_abs}; the squares underflowed float64, so "
                         "rescale the values before estimating the shape")
    log_rho = math.log(n) + math.log(sum_sq) - 2.0 * math.log(sum_abs)
    if log_rho >= log_moment_ratio(NU_MIN):
        return NU_MIN
    if log_rho <= log_moment_ratio(NU_MAX):
        return NU_MAX
    lo, hi = math.log(NU_MIN), math.log(NU_MAX)  # ρ(e^lo) > ρ̂ > ρ(e^hi)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if log_moment_ratio(math.exp(mid)) > log_rho:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def estimate_shape(tensors: Iterable[torch.Tensor]) -> float:
    """ν̂ of the generalized Gaussian fitted to all elements of ``tensors`` pooled, in [0.1, 3].

    tensors: float16/bfloat16/float32/float64 of any shape, one device.  One fused pass
    (``ops.rate_stats``, float64 sums) and a scalar bisection; see ``shape_from_moments``.
    Raises ValueError for an empty list, zero elements, all-zero values, or NaN/Inf values.
    """
    n, sum_abs, sum_sq = rate_stats(tensors).tolist()
    if n == 0:
        raise ValueError("tensors: no elements to estimate the shape from; pass non-empty weights")
    if not (math.isfinite(sum_abs) and math.isfinite(sum_sq)):
        raise ValueError(f"tensors: contain NaN or Inf (Σ|θ| = {sum_abs}, Σθ² = {sum_sq}); the shape is "
                         "undefined")
    if sum_abs == 0:
        raise ValueError("tensors: all values are zero, so the generalized-Gaussian shape is undefined; "
                         "estimate it from non-zero weights")
    return shape_from_moments(n, sum_abs, sum_sq)

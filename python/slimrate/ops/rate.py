"""The BackSlash rate ops: moment statistics and the fused rate-proxy gradient over a whole model.

R(θ) = (1/N) Σ_i (|θ_i| + ε)^ν over every element of every tensor (docs/backslash.md §2).  Lists of
DTensors (FSDP2's sharded parameters) go to ops/rate_sharded.py: kernels on the local shards, global sums.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from slimrate.ops.backend import extension_available, pick_backend, resolve_backend
from slimrate.ops.checks import check_separate_grads, finite_number, float_tensor_list


def rate_stats(tensors: Iterable[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """(N, Σ|θ|, Σθ²) over a list of float tensors of any shape, in one pass.

    tensors: float16/bfloat16/float32/float64, one device.  Returns float64 [3] on that device
    (zeros on CPU for an empty list).  Sums are accumulated in float64.
    DTensors (all on one mesh, Shard/Replicate placements): the global sums of the full tensors, a plain
    tensor equal on every rank, after one all_reduce over the mesh (docs/backslash.md §9).
    """
    xs = float_tensor_list("tensors", tensors)
    if any(is_dtensor(x) for x in xs):
        from slimrate.ops.rate_sharded import sharded_rate_stats  # imports torch.distributed only when used

        return sharded_rate_stats(xs, backend)
    if not xs:
        resolve_backend("rate_stats", backend)  # a bad backend is refused even with nothing to do
        return torch.zeros(3, dtype=torch.float64)
    return pick_backend("rate_stats", backend, xs[0].device)(xs)


def rate_grad_(params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor], lam: float, nu: float,
               eps: float, *, backend: str | None = None) -> torch.Tensor:
    """Add lam·∂R/∂θ into each grad in place and return R, in one fused pass per tensor.

    params, grads: matching lists, same shapes and dtype per pair (float16/bfloat16/float32/float64),
    one device.  grads[i] += lam·(ν/N)·sign(θ)·(|θ|+ε)^(ν−1) with sign(0) = 0, N = Σ numel, computed
    in float32 (float64 for float64 inputs) and rounded once into the grad's dtype; R is summed in
    float64 on every backend.  grads[i] may be params[i] itself (then θ is
    updated in place, e.g. lam < 0 for the decoupled shrink); any other sharing of memory (two grads, a
    tensor listed twice in grads, a grad and another param, or a partial overlap) raises ValueError.
    Returns R = (1/N) Σ (|θ|+ε)^ν as a float64 [] tensor (0 when N = 0).
    DTensors (grads placed like params, all on one mesh): N and R are global (R after one all_reduce of
    one number, equal on every rank), each local shard gets the update of the full tensor
    (docs/backslash.md §9).
    """
    ps = float_tensor_list("params", params)
    gs = float_tensor_list("grads", grads)
    lam = finite_number("lam", lam)
    nu = finite_number("nu", nu, positive=True)
    eps = finite_number("eps", eps, nonnegative=True)
    if len(ps) != len(gs):
        raise ValueError(f"grads: expected one gradient per parameter ({len(ps)}), got {len(gs)}")
    for i, (p, g) in enumerate(zip(ps, gs, strict=False)):
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"grads[{i}]: expected shape {tuple(p.shape)}, {p.dtype} on {p.device} like "
                             f"params[{i}], got {tuple(g.shape)}, {g.dtype} on {g.device}")
    if any(is_dtensor(t) for t in ps + gs):
        from slimrate.ops.rate_sharded import sharded_rate_grad_

        return sharded_rate_grad_(ps, gs, lam, nu, eps, backend)
    check_separate_grads(ps, gs)
    if not ps:
        resolve_backend("rate_grad_", backend)
        return torch.zeros((), dtype=torch.float64)
    return pick_backend("rate_grad_", backend, ps[0].device)(ps, gs, lam, nu, eps)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch.distributed.tensor.DTensor; none exists before that package is imported,
    so it is not imported here (it takes ~1 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


if extension_available():
    @torch.library.register_fake("slimrate::rate_stats")
    def _rate_stats_fake(tensors):
        return tensors[0].new_empty((3,), dtype=torch.float64)

    @torch.library.register_fake("slimrate::rate_grad_")
    def _rate_grad_fake(params, grads, lam, nu, eps):
        return params[0].new_empty((), dtype=torch.float64)

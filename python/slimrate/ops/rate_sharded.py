"""The BackSlash rate ops on DTensors (FSDP2's sharded parameters): kernels on the local shards, sums
all-reduced over the device mesh (docs/backslash.md §9).

A list is all plain tensors or all DTensors on one mesh.  Each rank runs the multi-tensor kernel on its
local shards (FSDP2's may be uneven, or empty on the last ranks) and one all_reduce sums the float64
contributions over the mesh's ranks.  A Replicate placement holds the same values on several ranks; only
the copy at coordinate 0 of every Replicate mesh dim is counted (exact, where dividing by the replica
count would round), while every copy gets its gradient.  Partial placements (pending sums) are refused.
``rate_stats``/``rate_grad_`` (ops/rate.py) come here when given DTensors; ``RateConstraint`` calls the
per-tensor helpers below, which take plain tensors too (then no collective runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimrate.ops.rate import is_dtensor, rate_grad_, rate_stats

FIX_MIXED = ("pass all plain tensors or all DTensors of one mesh; with FSDP2, apply fully_shard to the root "
             "module too, so that no parameter stays a plain tensor")


@dataclass
class LocalParts:
    """A list of tensors as this rank sees them.

    tensors: the local shards (the tensors themselves when plain).  counted[i]: tensors[i] counts in the
    global sums on this rank (False for a replica off coordinate 0).  numel: Σ global numel (no collective).
    mesh: the DeviceMesh, None for plain tensors.
    """

    tensors: list[torch.Tensor]
    counted: list[bool]
    numel: int
    mesh: object | None

    def all_reduce(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` summed over the mesh's ranks, in place (one collective); unchanged for plain tensors."""
        if self.mesh is not None:
            dist.all_reduce(local, group=_mesh_group(self.mesh))
        return local


def local_parts(name: str, tensors: Sequence[torch.Tensor]) -> LocalParts:
    """``tensors`` (plain or DTensors, checked by the op face) split into this rank's parts; ValueError
    naming ``name`` for a mixed list, two meshes or a Partial placement."""
    numel = sum(t.numel() for t in tensors)  # a DTensor's numel is global
    dtensors = [is_dtensor(t) for t in tensors]
    if not any(dtensors):
        return LocalParts(list(tensors), [True] * len(tensors), numel, None)
    first = dtensors.index(True)
    mesh = tensors[first].device_mesh
    if not all(dtensors):
        i = dtensors.index(False)
        raise ValueError(f"{name}[{i}]: expected a DTensor like {name}[{first}] (on {mesh}), got a plain "
                         f"tensor; {FIX_MIXED}")
    counted = []
    for i, t in enumerate(tensors):
        if t.device_mesh != mesh:
            raise ValueError(f"{name}[{i}]: is on {t.device_mesh}, {name}[{first}] on {mesh}; the statistics "
                             f"are reduced over one mesh, so {FIX_MIXED}")
        for dim, placement in enumerate(t.placements):
            if placement.is_partial():
                raise ValueError(f"{name}[{i}]: has a Partial placement on mesh dim {dim} (its local values are "
                                 "unreduced parts of a sum); redistribute it first, e.g. "
                                 "t.redistribute(placements=[Shard(0)])")
        counted.append(all(mesh.get_local_rank(dim) == 0
                           for dim, placement in enumerate(t.placements) if placement.is_replicate()))
    return LocalParts([t.to_local() for t in tensors], counted, numel, mesh)


def _mesh_group(mesh):
    """The process group spanning all of ``mesh``'s ranks: its own for a 1-D mesh, the default group for an
    N-D mesh over the whole world."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None
    raise ValueError(f"tensors: on a {mesh.ndim}-D mesh of {mesh.size()} ranks in a world of "
                     f"{dist.get_world_size()}; the rate statistics need one group over the mesh's ranks, so "
                     "use a 1-D mesh or an N-D mesh over the whole world")


def local_rate_stats(parts: LocalParts, *, backend: str | None = None) -> torch.Tensor:
    """This rank's counted share of (N, Σ|θ|, Σθ²), float64 [3] on the tensors' device (not reduced)."""
    counted = [t for t, keep in zip(parts.tensors, parts.counted, strict=True) if keep]
    return rate_stats(counted, backend=backend).to(parts.tensors[0].device)  # a list of none gives CPU zeros


def rate_stats_per_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n_t, Σ|θ_t|, Σθ_t²) of each tensor, float64 [T, 3]: T kernel calls and, for DTensors, one all_reduce."""
    parts = local_parts("tensors", tensors)
    zeros = torch.zeros(3, dtype=torch.float64, device=parts.tensors[0].device)
    stats = torch.stack([rate_stats([t]) if keep else zeros
                         for t, keep in zip(parts.tensors, parts.counted, strict=True)])
    return parts.all_reduce(stats)


def param_and_grad_parts(params: Sequence[torch.Tensor],
                         grads: Sequence[torch.Tensor]) -> tuple[LocalParts, list[torch.Tensor]]:
    """(parts of params, local grads), checking that each grad is placed like its param."""
    parts, grad_parts = local_parts("params", params), local_parts("grads", grads)
    if grad_parts.mesh != parts.mesh:
        raise ValueError(f"grads: on {grad_parts.mesh}, params on {parts.mesh}; {FIX_MIXED}")
    if parts.mesh is not None:
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g.placements != p.placements:
                raise ValueError(f"grads[{i}]: placed {g.placements}, params[{i}] {p.placements}; pass gradients "
                                 "sharded like their parameters (FSDP2's p.grad is)")
    return parts, grad_parts.tensors


def local_rate_grad_(params: LocalParts, grads: Sequence[torch.Tensor], groups: list[tuple[list[int], float]],
                     lam: float, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """grads[i] += lam·(ν_g/N)·sign(θ)·(|θ|+ε)^(ν_g−1) for each group (indices, ν_g), N = params.numel the
    global count; returns this rank's counted share of R = (1/N)·Σ(|θ|+ε)^ν, float64 [] (not reduced).

    One kernel call per group; a group's kernel normalises by its local count n, so λ and R are scaled by n/N.
    grads: local tensors matching params.tensors; a group is all counted or all not.
    """
    total = torch.zeros((), dtype=torch.float64, device=params.tensors[0].device)
    for indices, nu in groups:
        ps = [params.tensors[i] for i in indices]
        n = sum(p.numel() for p in ps)
        if n == 0:
            continue  # nothing here (an empty FSDP2 shard, or N = 0): the kernel would add and return 0
        share = n / params.numel
        value = rate_grad_(ps, [grads[i] for i in indices], lam * share, nu, eps, backend=backend)
        if params.counted[indices[0]]:
            total += share * value
    return total


def rate_grad_per_tensor_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lam: float,
                          nus: Sequence[float], eps: float) -> torch.Tensor:
    """rate_grad_ with a ν per tensor and R over the global N: T kernel calls and, for DTensors, one
    all_reduce of R (float64 [])."""
    parts, local_grads = param_and_grad_parts(params, grads)
    groups = [([i], nu) for i, nu in enumerate(nus)]
    return parts.all_reduce(local_rate_grad_(parts, local_grads, groups, lam, eps))


def sharded_rate_stats(tensors: list[torch.Tensor], backend: str | None) -> torch.Tensor:
    """``rate_stats`` of DTensors: global (N, Σ|θ|, Σθ²), float64 [3], after one all_reduce."""
    parts = local_parts("tensors", tensors)
    return parts.all_reduce(local_rate_stats(parts, backend=backend))


def sharded_rate_grad_(params: list[torch.Tensor], grads: list[torch.Tensor], lam: float, nu: float, eps: float,
                       backend: str | None) -> torch.Tensor:
    """``rate_grad_`` of DTensors: the global N and R, after one all_reduce of R; grads placed like params.
    One kernel call for the counted tensors and one for replicas off coordinate 0, if any."""
    parts, local_grads = param_and_grad_parts(params, grads)
    counted = [i for i, keep in enumerate(parts.counted) if keep]
    replicas = [i for i, keep in enumerate(parts.counted) if not keep]
    groups = [(indices, nu) for indices in (counted, replicas) if indices]
    return parts.all_reduce(local_rate_grad_(parts, local_grads, groups, lam, eps, backend=backend))

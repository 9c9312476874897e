"""The worker of tests/test_rate_sharded.py, run by torchrun on 2 CPU ranks (gloo): the rate ops on DTensors and
RateConstraint under FSDP2 (fully_shard) and DDP.  Each rank writes ``<out>/rank<RANK>.pt``:

- "ops": per placement, the full inputs, rate_stats of the DTensors, and rate_grad_'s R and full grads after;
- "runs": per case of CASES, R and ν (nu_per_tensor) at every step, the constraint's state_dict and the full
  parameters after STEPS steps.

The test runs the same cases on one process (``run_single``) and compares.  Model, data and cases live here so
both sides build them alike.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slimrate.backslash import RateConstraint
from slimrate.ops import rate_grad_, rate_stats

STEPS = 5
GLOBAL_BATCH = 8
FEATURES = 7
# (mode, shape_scope, include, nu, optimizer); the 2×2×2 grid, a fixed ν and Adam.
CASES = [(mode, scope, include, "auto", "sgd")
         for mode in ("grad", "decoupled") for scope in ("global", "tensor") for include in ("weights", "all")]
CASES += [("grad", "tensor", "all", 1.3, "sgd"), ("grad", "global", "all", "auto", "adam")]
DDP_CASES = [("grad", "tensor", "all", "auto", "sgd"), ("decoupled", "global", "weights", "auto", "sgd")]
# Shapes whose Shard(0)/Shard(1) pieces on 2 ranks are uneven or empty: (1, 3) leaves rank 1 no row.
OP_SHAPES = [(5, 7), (1, 3), (3, 1)]


def build_model() -> nn.Module:
    """Linear–LayerNorm–Linear–Linear with odd sizes: FSDP2 gives rank 1 an uneven shard of every weight and
    an empty shard of the last layer's weight (1, 5) and bias (1,)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 9), nn.LayerNorm(9), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: x (GLOBAL_BATCH, FEATURES), y (GLOBAL_BATCH, 1)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, FEATURES, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def train_case(model: nn.Module, case: tuple, rank: int = 0, world: int = 1) -> dict:
    """STEPS steps of MSE training with a RateConstraint on ``model`` (plain, DDP or fully_shard'ed), each rank
    on its slice of the global batch; returns R and ν per step, the constraint's state and the full params."""
    mode, scope, include, nu, optimizer_name = case
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer_name == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-2))
    # λ large enough that the rate term moves the weights as much as the loss does.
    constraint = RateConstraint(model, lam=0.05, mode=mode, include=include, shape_scope=scope, nu=nu)
    rates, nus = [], []
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        if mode == "grad":
            rates.append(constraint.step())
        optimizer.step()
        if mode == "decoupled":
            rates.append(constraint.step())
        nus.append(list(constraint.nu_per_tensor))
    params = {name.removeprefix("module."): full(p) for name, p in model.named_parameters()}
    return {"rates": rates, "nus": nus, "state": constraint.state_dict(), "params": params,
            "names": constraint.param_names}


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered), or ``t``, detached."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_ops(mesh) -> dict:
    """rate_stats and rate_grad_ (grad and in-place) on DTensors of each placement, with the full inputs."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    for placement in (Shard(0), Shard(1), Replicate()):
        g = torch.Generator().manual_seed(7)  # the same full tensors on every rank
        tensors = [torch.randn(shape, generator=g) for shape in OP_SHAPES]
        grads = [torch.randn(shape, generator=g) for shape in OP_SHAPES]
        # distribute_tensor may keep the given tensor as the local one (Replicate): give it copies.
        dts, dgrads, inplace = ([distribute_tensor(t.clone(), mesh, [placement]) for t in ts]
                                for ts in (tensors, grads, tensors))
        stats = rate_stats(dts)
        rate = rate_grad_(dts, dgrads, 0.7, 1.4, 0.5)
        rate_inplace = rate_grad_(inplace, inplace, -0.7, 1.4, 0.5)
        out[repr(placement)] = {"tensors": tensors, "grads": grads, "stats": stats, "rate": rate,
                               "grads_after": [full(t) for t in dgrads], "rate_inplace": rate_inplace,
                               "inplace_after": [full(t) for t in inplace]}
    return out


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    result = {"ops": run_ops(mesh), "runs": {}, "ddp": {}}
    for case in CASES:
        model = build_model()
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        result["runs"][case] = train_case(model, case, rank, world)
    for case in DDP_CASES:
        result["ddp"][case] = train_case(DistributedDataParallel(build_model()), case, rank, world)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One torchrun worker of bench_fsdp.py: the cost of BackSlash's rate term in an FSDP2 training step.

    torchrun --nproc_per_node=2 bench/fsdp_rate_worker.py --out fsdp.json [--width 4096 --layers 6]

The model: --layers blocks of Linear(width, width) + GELU (≥ 100M parameters at the defaults), each block
sharded with slimrate.train.shard_model (FSDP2 fully_shard per block, then the root), Adam.  Three kinds of
training step on the same model:

- plain: forward, backward, optimizer step;
- backslash: the same with RateConstraint(mode="loss", nu="auto") between backward and the optimizer step
  (slimrate's DTensor-aware rate ops: kernels on the local shards, the statistics all-reduced);
- gather: the same rate term computed the way one would without DTensor-aware ops: every parameter and
  gradient gathered in full (``full_tensor()``), rate_stats and rate_grad_ over the full tensors on every rank,
  this rank's rows of the result copied back into its gradient shard.

Plain and backslash steps alternate (ABBA order over the rounds), so drift of the machine hits both alike;
the gather steps run after them, each after an untimed plain step (the memory its full tensors take and free
would otherwise slow the step that follows it).  Within the two rate terms, the time spent inside
torch.distributed.all_reduce is summed (the gather variant's all-gathers run inside DTensor's redistribution,
which this count does not see).  Rank 0 writes medians (ms) of each quantity to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from slimrate.backslash import RateConstraint
from slimrate.backslash.shape import shape_from_moments
from slimrate.ops import rate_grad_, rate_stats
from slimrate.train import init_distributed, shard_model

LAM, EPS = 1e-3, 1.0


class CollectiveTimer:
    """Wraps torch.distributed.all_reduce: counts the calls and sums their wall time while ``active``."""

    def __init__(self) -> None:
        self.active, self.calls, self.seconds = False, 0, 0.0
        self._all_reduce = dist.all_reduce
        dist.all_reduce = self._timed

    def _timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._all_reduce(*args, **kwargs)
        finally:
            if self.active:
                self.calls += 1
                self.seconds += time.perf_counter() - start

    def measure(self, fn) -> tuple[float, float, int]:
        """(wall seconds of fn(), seconds inside all_reduce, all_reduce calls)."""
        self.active, self.calls, self.seconds = True, 0, 0.0
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        self.active = False
        return wall, self.seconds, self.calls


def gathered_rate_term(params: list[torch.Tensor], rank: int, world_size: int) -> float:
    """λ·∂R/∂θ into the gradient shards by gathering full parameters and gradients; returns R."""
    fulls = [p.full_tensor() for p in params]
    grads = [p.grad.full_tensor() for p in params]
    n, sum_abs, sum_sq = rate_stats(fulls).tolist()
    value = rate_grad_(fulls, grads, LAM, shape_from_moments(n, sum_abs, sum_sq), EPS)
    for p, g in zip(params, grads, strict=True):
        local = p.grad.to_local()
        if local.numel():
            local.copy_(g.chunk(world_size, dim=0)[rank])  # FSDP2 shards dim 0 as torch.chunk does
    return value.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16, help="rows per rank")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    info, _ = init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(args.width, args.width), nn.GELU())
                            for _ in range(args.layers)]).to(info.device)
    num_params = sum(p.numel() for p in model.parameters())
    model = shard_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    constraint = RateConstraint(model, lam=LAM, eps=EPS, mode="loss")
    timer = CollectiveTimer()
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(info.rank)).to(info.device)

    def step(rate_term) -> dict[str, float]:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        rate = (0.0, 0.0, 0)
        if rate_term is not None:
            rate = timer.measure(rate_term)
        optimizer.step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        return {"step": time.perf_counter() - start, "rate": rate[0], "collective": rate[1], "calls": rate[2]}

    params = constraint.params
    variants = {"plain": None, "backslash": constraint.step,
                "gather": lambda: gathered_rate_term(params, info.rank, info.world_size)}
    times: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for r in range(args.warmup + args.rounds):
        for name in (("plain", "backslash") if r % 2 == 0 else ("backslash", "plain")):
            result = step(variants[name])
            if r >= args.warmup:
                times[name].append(result)
    for r in range(args.warmup + args.rounds):
        step(None)
        result = step(variants["gather"])
        if r >= args.warmup:
            times["gather"].append(result)

    def median_ms(name: str, key: str) -> float:
        return statistics.median(t[key] for t in times[name]) * 1e3

    if info.is_main:
        result = {"world_size": info.world_size, "num_params": num_params, "width": args.width,
                  "layers": args.layers, "batch_per_rank": args.batch, "rounds": args.rounds,
                  "threads_per_rank": torch.get_num_threads()}
        for name in variants:
            result[name] = {"step_ms": median_ms(name, "step"), "rate_ms": median_ms(name, "rate"),
                            "all_reduce_ms": median_ms(name, "collective"),
                            "all_reduce_calls": int(statistics.median(t["calls"] for t in times[name]))}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""torchrun support: read the launcher's environment, start the process group, reduce and share values.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; without them (or with WORLD_SIZE=1)
training runs as one plain process.  CUDA uses NCCL with one GPU per process (cuda:LOCAL_RANK);
the CPU uses gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node,
    and the ``device`` its model and batches belong on (cuda:LOCAL_RANK under NCCL, else the CPU)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and the progress bar."""
        return self.rank == 0


def init_distributed() -> tuple[DistributedInfo, bool]:
    """Start the default process group when launched by torchrun and none exists yet.

    Returns (info, started): ``started`` is True when this call created the group, so the caller
    that started it also ends it (``dist.destroy_process_group()``).  Safe to call more than once.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedInfo(0, 1, 0, torch.device("cpu")), False
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # NCCL collectives and all_gather_object use the current device
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    return DistributedInfo(rank, world_size, local_rank, device), started


def sum_across_ranks(values: torch.Tensor, info: DistributedInfo) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (a copy; the input itself when not distributed)."""
    if not info.is_distributed:
        return values
    total = values.detach().to(info.device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_objects(obj: Any, info: DistributedInfo) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects, e.g. RNG states)."""
    if not info.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: DistributedInfo) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; what the other ranks pass is ignored)."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistributedInfo) -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if info.is_distributed:
        dist.barrier()

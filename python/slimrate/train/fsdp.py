"""FSDP2 support: shard a model over all ranks, tell a sharded model apart, gather its full weights.

FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces each parameter by a DTensor holding this rank's
shard; an optimizer (and anything else that keeps the parameters, such as a RateConstraint) must be built
after sharding, so the training loop does not shard: call ``shard_model`` first (docs/training.md §5).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from slimrate.train.distributed import init_distributed


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` with FSDP2 over a 1-D mesh of all ranks, in place, and return it: each block (every
    child of every ``nn.ModuleList``, e.g. transformer layers) is its own unit, gathered only while it
    runs; then the root, which holds the rest.  Under torchrun, starts the process group if needed
    (``init_distributed``); the model must already be on ``init_distributed()[0].device``.  In one process
    the model is returned unchanged.  Build the optimizer after this call."""
    info, _ = init_distributed()
    if not info.is_distributed:
        return model
    if is_sharded(model):
        raise ValueError("model: already sharded (its parameters are DTensors); call shard_model once")
    device = next(model.parameters()).device
    if device != info.device:
        raise ValueError(f"model: expected on {info.device} (rank {info.rank}), got {device}; move it with "
                         "model.to(init_distributed()[0].device) before shard_model")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in reversed(blocks):  # inner blocks (a ModuleList inside a block) before the blocks holding them
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (sharded by ``fully_shard``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with whole tensors, on every rank (a collective when sharded: every rank must
    call it); for a model that is not sharded, its state_dict as it is."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))

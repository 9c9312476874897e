"""FSDP2 support: shard a model over all ranks, tell a sharded model apart, gather its full weights.

FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces each parameter by a DTensor holding this rank's
shard; an optimizer (and anything else that keeps the parameters, such as a RateConstraint) must be built
after sharding, so the training loop does not shard: call ``shard_model`` first (docs/training.md §6).
torch.distributed's FSDP, DTensor and checkpoint modules are imported when first used: they add about a
second to every ``import slimrate.train`` otherwise.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from slimrate.train.distributed import init_distributed


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` with FSDP2 over a 1-D mesh of all ranks, in place, and return it: each block (every
    child of every ``nn.ModuleList``, e.g. transformer layers) is its own unit, gathered only while it
    runs; then the root, which holds the rest.  Under torchrun, starts the process group if needed
    (``init_distributed``); the model must already be on ``init_distributed()[0].device``.  In one process
    the model is returned unchanged.  Build the optimizer after this call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

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
    """True when ``fully_shard`` was applied to ``model`` or a module in it.  (Its parameters are DTensors,
    except while FSDP2 holds a unit's whole weights: the root's stay gathered after a forward pass without
    backward, an evaluation say, until the next forward.)"""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported yet: nothing can be sharded
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with whole tensors, on every rank (a collective when sharded: every rank must
    call it); for a model that is not sharded, its state_dict as it is."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))

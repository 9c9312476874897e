"""Write a torch.distributed.checkpoint folder of an FSDP2-sharded model, for tests/test_checkpoints_dcp.py.

Run by ``torchrun --nproc_per_node=2``: an MLP of ``--layers`` Linear(width, width + 1) layers (odd row counts, so
the two ranks hold uneven shards) and a LayerNorm, sharded with ``fully_shard`` per layer and at the root, after one
Adam step; saved as the training loop's sharded checkpoints are, ``{"model": ..., "optimizer": ...}`` with
``dcp.save`` into ``<out>/dcp``. Rank 0 also writes the model's full state dict to ``<out>/full.safetensors``, the
reference the test compares against. With ``--nproc_per_node=1`` or plain ``python``: the same, unsharded, saved
with ``dcp.save(..., no_dist=True)``.
"""

import argparse
import itertools
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard


def build(width: int, layers: int) -> nn.Sequential:
    sizes = [width + i for i in range(layers + 1)]  # width → width+1 → ...: odd and even row counts
    return nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(sizes)], nn.LayerNorm(sizes[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--width", type=int, default=9)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)  # every rank builds the same model; fully_shard keeps each rank's rows of it
    model = build(args.width, args.layers).to(getattr(torch, args.dtype))
    if distributed:
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, args.width, dtype=getattr(torch, args.dtype))).square().mean().backward()
    optimizer.step()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=os.path.join(args.out, "dcp"), no_dist=not distributed)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed or dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(args.out, "full.safetensors"))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A small training run for the subprocess tests of tests/test_train.py (kill-and-resume, torchrun/DDP) and
tests/test_train_fsdp.py (torchrun/FSDP2; also called in-process there through ``main(argv)``).

A 8-32-1 MLP (two blocks in an nn.ModuleList, so FSDP2 shards each) regressing a fixed random function, with
a StepLR schedule and hooks: a BackSlash RateConstraint (grad mode), an EMA of the weights (a hook whose
state is sharded with the model), or both; batches are a function of (seed, step) only.  Each process writes the
model's final whole weights to ``<out>/final-rank<RANK>.safetensors``.
"""

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slimrate.backslash import RateConstraint
from slimrate.dmb.driver import EMA
from slimrate.train import TrainConfig, full_state_dict, shard_model, train

SAMPLES, FEATURES, HIDDEN = 256, 8, 32
DATA_SEED = 1234


class SlowDown:
    """Sleeps after every step so a test can kill the run mid-way; changes no numbers."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def after_step(self, step: int) -> None:
        time.sleep(self.seconds)


class MLP(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Dropout(dropout)),
                                     nn.Linear(HIDDEN, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--hook", choices=["rate", "ema", "both"], default="rate")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a fixed thread count: reductions keep their order from run to run
    torch.use_deterministic_algorithms(True)
    data = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(SAMPLES, FEATURES, generator=data)
    y = torch.sin(x @ torch.randn(FEATURES, 1, generator=data))

    torch.manual_seed(0)
    model = MLP(args.dropout)
    if args.parallel == "fsdp":
        shard_model(model)  # before the optimizer and the hooks, which keep the (sharded) parameters
    optimizer = (torch.optim.Adam(model.parameters(), lr=1e-2) if args.optimizer == "adam"
                 else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    hooks = ([RateConstraint(model, lam=1e-3, mode="grad")] if args.hook in ("rate", "both") else []) + (
        [EMA(model, 0.9)] if args.hook in ("ema", "both") else [])
    if args.step_delay:
        hooks.append(SlowDown(args.step_delay))

    def get_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, SAMPLES, (args.global_batch,), generator=torch.Generator().manual_seed(step))
        shard = idx.tensor_split(world_size)[rank]
        return x[shard], y[shard]

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.mse_loss(net(inputs), targets)

    config = TrainConfig(steps=args.steps, out_dir=args.out, checkpoint_every=args.checkpoint_every,
                         resume=args.resume, log_every=10, max_grad_norm=1.0, tensorboard=False, progress=False,
                         parallel=args.parallel)
    train(model, optimizer, loss_fn, get_batch, config, scheduler=scheduler, hooks=hooks)
    rank = int(os.environ.get("RANK", "0"))
    weights = {name: t.contiguous() for name, t in full_state_dict(model).items()}
    save_file(weights, str(Path(args.out) / f"final-rank{rank}.safetensors"))
    if dist.is_initialized():  # started by shard_model, so train left it running
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

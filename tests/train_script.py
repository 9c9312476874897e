"""A small training run for tests/test_train.py's subprocess tests (kill-and-resume, torchrun/DDP).

A 8-32-1 MLP regressing a fixed random function, with a StepLR schedule and a BackSlash
RateConstraint (grad mode) as a hook; batches are a function of (seed, step) only.  Each process
writes its final weights to ``<out>/final-rank<RANK>.safetensors``.
"""

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slimrate.backslash import RateConstraint
from slimrate.train import TrainConfig, train

SAMPLES, FEATURES, HIDDEN = 256, 8, 32
DATA_SEED = 1234


class SlowDown:
    """Sleeps after every step so a test can kill the run mid-way; changes no numbers."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def after_step(self, step: int) -> None:
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--global-batch", type=int, default=32)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a fixed thread count: reductions keep their order from run to run
    torch.use_deterministic_algorithms(True)
    data = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(SAMPLES, FEATURES, generator=data)
    y = torch.sin(x @ torch.randn(FEATURES, 1, generator=data))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Dropout(args.dropout), nn.Linear(HIDDEN, 1))
    optimizer = (torch.optim.Adam(model.parameters(), lr=1e-2) if args.optimizer == "adam"
                 else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    hooks = [RateConstraint(model, lam=1e-3, mode="grad")]
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
                         resume=args.resume, log_every=10, max_grad_norm=1.0, tensorboard=False, progress=False)
    train(model, optimizer, loss_fn, get_batch, config, scheduler=scheduler, hooks=hooks)
    rank = int(os.environ.get("RANK", "0"))
    save_file(model.state_dict(), str(Path(args.out) / f"final-rank{rank}.safetensors"))


if __name__ == "__main__":
    main()

"""The training loop: a step budget, schedule, hooks, clipping, autocast, logging, checkpoints, DDP and FSDP2.

Data comes by step: ``get_batch(step, rank, world_size)`` returns this rank's shard of the global
batch of ``step``, as a deterministic function of its arguments (e.g. indices drawn from a generator
seeded with (seed, step)).  So a resumed run sees the same batches as an uninterrupted one with no
data-loader state to save, and N ranks (DDP or FSDP2) together see the batch one process would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from slimrate.train.checkpoint import DEFAULT_KEEP
from slimrate.train.distributed import DistributedInfo, init_distributed, sum_across_ranks
from slimrate.train.fsdp import is_sharded
from slimrate.train.metrics import MetricsLogger, check_wandb_installed
from slimrate.train.resume import resume_run, save_run
from slimrate.train.rng import seed_everything

CHECKPOINTS_DIR = "checkpoints"
AUTOCAST_DTYPES = (None, torch.bfloat16)
PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Settings of one run.  Step counts are optimizer steps; "at step k" means after k steps.

    steps: the budget.  out_dir: where metrics (``metrics.jsonl``, ``tensorboard/``, ``wandb/``)
    and ``checkpoints/`` go; None writes nothing.  eval_every: evaluate every k steps (0: only at the
    end; the end always).  log_every: a training log record (mean loss since the last one, lr,
    samples/s) every k steps and at the end.  checkpoint_every: save every k steps and at the end (0:
    never), keeping the newest ``keep_checkpoints`` (default 2, so a damaged newest one leaves another).
    resume: continue from the newest checkpoint in out_dir that verifies, when there is one (else start
    afresh); ``slimrate.train.resume`` says what happens to the ones that do not.
    max_grad_norm: clip the gradients' total 2-norm.
    autocast_dtype: None or torch.bfloat16 (CPU and CUDA; float16 would need loss scaling).
    seed: seeds torch, random and numpy at a fresh start (rank r uses seed + r).
    parallel: under torchrun, "ddp" wraps the model in DistributedDataParallel; "fsdp" expects a model
    sharded with ``slimrate.train.shard_model`` (before the optimizer was built) and writes sharded
    checkpoints (docs/training.md §6).  In one process nothing is wrapped either way.
    """

    steps: int
    out_dir: str | None = None
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = DEFAULT_KEEP
    resume: bool = False
    max_grad_norm: float | None = None
    autocast_dtype: torch.dtype | None = None
    seed: int = 0
    parallel: str = "ddp"
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("eval_every", 0), ("log_every", 1), ("checkpoint_every", 0),
                          ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm: expected None or a finite number > 0, got {self.max_grad_norm!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel: expected one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype: expected None or torch.bfloat16, got {self.autocast_dtype}; "
                             "float16 needs gradient scaling, which this loop does not do")
        needs_dir = [name for name in ("resume", "checkpoint_every", "wandb") if getattr(self, name)]
        if needs_dir and self.out_dir is None:
            raise ValueError(f"out_dir: {', '.join(needs_dir)} need an out_dir to write to, got None")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "autocast_dtype": str(self.autocast_dtype) if self.autocast_dtype else None}


@dataclass
class TrainResult:
    """step: steps done; loss: mean training loss of the last log window over all ranks (nan when
    no step ran); eval: the final evaluation ({} without ``evaluate``); start_step: 0, or the step of
    the checkpoint the run resumed from."""

    step: int
    loss: float
    eval: dict[str, float] = field(default_factory=dict)
    start_step: int = 0


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
          get_batch: Callable[[int, int, int], Any], config: TrainConfig, *,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
          hooks: Iterable[Any] = ()) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps; returns a ``TrainResult``.

    Each step (counted from 0): ``batch = get_batch(step, rank, world_size)``, ``loss = loss_fn(model,
    batch)`` under autocast (the DDP-wrapped model under torchrun with parallel="ddp"), backward, gradient
    clipping, hooks' ``after_backward``, ``optimizer.step()``, ``scheduler.step()``, hooks' ``after_step``.

    A hook may define any of (all optional): ``after_backward(step)``, after the backward pass (under DDP:
    after the gradients are averaged over ranks; under FSDP2: averaged and sharded) and after clipping, so
    what it adds to the gradients is not clipped, as in the transformers Trainer's ``on_pre_optimizer_step``;
    ``after_step(step)``;
    ``metrics() -> dict[str, float]``, extra values for each training log record; ``state_dict()`` /
    ``load_state_dict(state)``, saved in and restored from checkpoints; ``as_train_hook()``, returning the
    object to use in its place (so a bare ``RateConstraint`` is accepted as a hook).  ``step`` is the
    0-based index of the step being taken (the one ``get_batch`` was called with).
    ``evaluate(model)`` runs on every rank in eval mode under no_grad; rank 0 logs its dict.

    Under torchrun the process group is started (gloo on CPU, NCCL on CUDA: put the model and the
    batches on cuda:LOCAL_RANK, see ``init_distributed``) and ended again if this call started it;
    only rank 0 writes logs, checkpoints and the progress bar (under FSDP2 each rank writes its part of
    the checkpoints); out_dir must be visible to every rank.
    Resume is bit-identical on CPU to an uninterrupted run when the computation is deterministic
    (``torch.use_deterministic_algorithms(True)``, a fixed thread count).
    """
    hooks = [h.as_train_hook() if hasattr(h, "as_train_hook") else h for h in hooks]
    if config.wandb:
        check_wandb_installed()  # fail before any work, on every rank
    info, started = init_distributed()
    try:
        return _train(model, optimizer, loss_fn, get_batch, config, scheduler, evaluate, hooks, info)
    finally:
        if started:
            dist.destroy_process_group()


def _train(model, optimizer, loss_fn, get_batch, config, scheduler, evaluate, hooks, info: DistributedInfo):
    device = next(model.parameters()).device
    if info.is_distributed and device != info.device:
        raise ValueError(f"model: expected on {info.device} (rank {info.rank}, LOCAL_RANK {info.local_rank}), "
                         f"got {device}; move it with model.to(init_distributed()[0].device) first")
    _check_parallel(model, config.parallel, info)
    checkpoints = Path(config.out_dir) / CHECKPOINTS_DIR if config.out_dir else None
    start = resume_run(config, checkpoints, model, optimizer, scheduler, hooks, info) if checkpoints else 0
    if start == 0:
        seed_everything(config.seed + info.rank)
    model.train()
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=[info.local_rank] if device.type == "cuda" else None) \
        if info.is_distributed and config.parallel == "ddp" else model
    autocast = (lambda: torch.autocast(device.type, dtype=config.autocast_dtype)) if config.autocast_dtype \
        else nullcontext
    logger = None
    if info.is_main and config.out_dir:
        logger = MetricsLogger(config.out_dir, start_step=start, tensorboard=config.tensorboard,
                               wandb=config.wandb, config=config.to_json())
    bar = tqdm(total=config.steps, initial=start, desc=config.desc, unit="step", leave=False, mininterval=0.5,
               disable=not (config.progress and info.is_main))
    after_backward = [h.after_backward for h in hooks if hasattr(h, "after_backward")]
    after_step = [h.after_step for h in hooks if hasattr(h, "after_step")]
    window = _LogWindow(device)
    result = TrainResult(step=start, loss=math.nan, start_step=start)
    try:
        for step in range(start, config.steps):
            batch = get_batch(step, info.rank, info.world_size)
            with autocast():
                loss = loss_fn(wrapped, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                         if config.max_grad_norm else None)
            for hook in after_backward:
                hook(step)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for hook in after_step:
                hook(step)
            done = result.step = step + 1
            window.add(loss, _batch_size(batch))
            bar.update()
            if done % config.log_every == 0 or done == config.steps:
                result.loss = _log_train(logger, bar, done, window.flush(info), lr, grad_norm, hooks)
            if evaluate is not None and config.eval_every and done % config.eval_every == 0 and done < config.steps:
                _log_eval(logger, done, _evaluate(evaluate, model, autocast))
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
                save_run(checkpoints, done, config, model, optimizer, scheduler, hooks, info)
        if evaluate is not None:
            result.eval = _evaluate(evaluate, model, autocast)
            _log_eval(logger, result.step, result.eval)
    finally:
        bar.close()
        if logger:
            logger.close()
    return result


def _check_parallel(model: nn.Module, parallel: str, info: DistributedInfo) -> None:
    """ValueError unless the model is sharded exactly when FSDP2 is asked for under torchrun."""
    sharded = is_sharded(model)
    if parallel == "ddp" and sharded:
        raise ValueError("model: its parameters are DTensors (sharded with fully_shard), but parallel='ddp'; "
                         "pass TrainConfig(parallel='fsdp')")
    if parallel == "fsdp" and info.is_distributed and not sharded:
        raise ValueError(f"model: parallel='fsdp' under torchrun ({info.world_size} processes) needs a sharded "
                         "model, got plain parameters; call slimrate.train.shard_model(model) before building "
                         "the optimizer")


class _LogWindow:
    """Loss and sample counts since the last log record, summed on the device (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.samples = self.steps = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss.detach()
        self.samples += samples
        self.steps += 1

    def flush(self, info: DistributedInfo) -> dict[str, float]:
        """{"loss": mean over steps and ranks, "samples_per_s": global samples per second}."""
        sums = torch.stack([self.loss_sum, torch.tensor(float(self.samples), dtype=torch.float64, device=self.device)])
        loss_sum, samples = sum_across_ranks(sums, info).tolist()  # one sync per log record
        elapsed = time.perf_counter() - self.start
        metrics = {"loss": loss_sum / (self.steps * info.world_size), "samples_per_s": samples / elapsed}
        self._reset()
        return metrics


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (in a tuple, list or dict)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if isinstance(item, (torch.Tensor, tuple, list, dict)):
            return _batch_size(item)
    raise TypeError(f"get_batch: expected a tensor or a tuple/list/dict holding tensors, got {type(batch).__name__}; "
                    "the first tensor's first dimension counts the samples for samples/s")


def _log_train(logger: MetricsLogger | None, bar: tqdm, step: int, metrics: dict[str, float], lr: float,
               grad_norm: torch.Tensor | None, hooks: list[Any]) -> float:
    """Write one training record (window metrics, lr, grad norm, hooks' metrics); returns the loss."""
    metrics["lr"] = float(lr)
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    for hook in hooks:
        metrics.update(hook.metrics() if hasattr(hook, "metrics") else {})
    bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{lr:.3g}", samples_s=f"{metrics['samples_per_s']:.0f}",
                    refresh=False)
    if logger:
        logger.log(step, metrics)
    return metrics["loss"]


def _evaluate(evaluate, model: nn.Module, autocast) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad(), autocast():
            metrics = evaluate(model)
    finally:
        model.train()
    return {name: float(value) for name, value in metrics.items()}


def _log_eval(logger: MetricsLogger | None, step: int, metrics: dict[str, float]) -> None:
    if logger:
        logger.log(step, {f"eval/{name}": value for name, value in metrics.items()})

"""The two training tasks the schedule and BackSlash studies share, built the same way for every run:
- digits: the demo's MLP on scikit-learn's 8×8 digits (Adam); metrics: test accuracy and loss;
- charlm: a small char-level transformer LM on the embedded text corpus (AdamW); metric: validation
  cross-entropy in bits per character.
A run's weights come from ``torch.manual_seed(seed)`` and its batch at step s from a generator seeded
with ``seed * 1_000_003 + s``, so two runs of one seed see the same data in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimrate.data.digits import load_digits_split
from slimrate.data.text import char_splits, load_text_corpus
from slimrate.models.char_lm import CharLM, CharLMConfig, bits_per_char, evaluate_lm, get_lm_batch
from slimrate.models.mlp import build_digits_mlp


@dataclass
class TaskConfig:
    """Model, optimizer and batch settings of the tasks."""

    digits_lr: float = 3e-3  # the demo's peak lr
    digits_batch: int = 64
    lm_lr: float = 3e-3  # a common AdamW peak for transformers of this size (54k parameters)
    lm_batch: int = 32
    lm: CharLMConfig = field(default_factory=CharLMConfig)
    lm_eval_batches: int = 8  # validation windows: lm_eval_batches × 64 fixed windows


def quick_task_config() -> TaskConfig:
    """The quick studies' settings: a tiny LM evaluated on one batch of windows."""
    return TaskConfig(lm=CharLMConfig(context=16, d_model=32, n_heads=2, n_layers=1), lm_eval_batches=1)


@dataclass
class Task:
    """What one run of a task needs; ``metrics(model)`` gives the final numbers, ``primary`` names the
    one the table and plot rank by, ``lower_is_better`` says which way."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    get_batch: Callable
    metrics: Callable[[nn.Module], dict[str, float]]
    primary: str
    lower_is_better: bool


def digits_task(cfg: TaskConfig, seed: int) -> Task:
    x_train, y_train, x_test, y_test = load_digits_split()
    torch.manual_seed(seed)
    model = build_digits_mlp()

    def get_batch(step: int, rank: int, world_size: int):
        idx = torch.randint(0, len(y_train), (cfg.digits_batch,), generator=torch.Generator().manual_seed(
            seed * 1_000_003 + step))
        return x_train[idx], y_train[idx]

    @torch.no_grad()
    def metrics(m: nn.Module) -> dict[str, float]:
        logits = m(x_test)
        return {"test_acc": float((logits.argmax(1) == y_test).double().mean()),
                "test_loss": float(F.cross_entropy(logits, y_test))}

    return Task(model, torch.optim.Adam(model.parameters(), lr=cfg.digits_lr),
                lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]), get_batch, metrics,
                primary="test_acc", lower_is_better=False)


def charlm_task(cfg: TaskConfig, seed: int) -> Task:
    train_ids, val_ids = char_splits(load_text_corpus())
    torch.manual_seed(seed)
    model = CharLM(cfg.lm)
    context = cfg.lm.context

    def get_batch(step: int, rank: int, world_size: int):
        return get_lm_batch(train_ids, cfg.lm_batch, context, torch.Generator().manual_seed(seed * 1_000_003 + step))

    def metrics(m: nn.Module) -> dict[str, float]:
        nats = evaluate_lm(m, val_ids, context, max_batches=cfg.lm_eval_batches)
        return {"val_bpc": float(bits_per_char(nats))}

    # fused: one kernel over all parameters; measured 1.6 → 0.7 ms per step on 2 CPU cores
    return Task(model, torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, weight_decay=0.1, fused=True),
                lambda m, batch: m.loss(*batch), get_batch, metrics, primary="val_bpc", lower_is_better=True)


TASKS = {"digits": digits_task, "charlm": charlm_task}
PRIMARY = {"digits": ("test_acc", False), "charlm": ("val_bpc", True)}  # (metric ranked by, lower is better)

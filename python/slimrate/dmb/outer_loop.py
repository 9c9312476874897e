"""DMB's outer loop as a training-loop hook (docs/dmb.md §9): p̂_0 re-estimation and matrix phases with the
network frozen, on one of two schedules, with one of two matrix objectives.

Schedules (``phases``):
- "interleaved": ``matrix_steps`` matrix steps before the first score step, then after every ``outer_every``
  score steps a p̂_0 re-estimate and another ``matrix_steps``.
- "official" (the schedule of the DMB authors' text8 script, arXiv:2505.19752's code): lengths in passes over
  the training windows, one step per batch of ``batch`` windows: ``q_passes`` passes of matrix steps before the
  first score step, then outer iterations of ``score_passes`` passes of score steps, each followed by a p̂_0
  re-estimate and ``q_passes`` passes of matrix steps (none after the last score step).
Objectives (``q_objective``): "prior", the prior KL exact over μ̂ (``matrix_loss``); "bound", DWDSE + prior KL on
a training batch per step (``matrix_bound_loss``).  The baselines and ``learn_q=False`` use no outer loop.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from slimrate.dmb.losses import matrix_bound_loss, matrix_loss
from slimrate.dmb.sampler import estimate_p0, reverse_sample

PHASES = ("interleaved", "official")
Q_OBJECTIVES = ("prior", "bound")
# p̂_0 from (sequences, Euler steps) per schedule when not given: 32 × 32 keeps the interleaved loop cheap on a
# CPU; 512 × 128 are the official script's numbers.
P0_DEFAULTS = {"interleaved": (32, 32), "official": (512, 128)}
MATRIX_CLIP = 1.0  # the official code's gradient clip of the rates
# Matrix steps of the bound objective draw their batches from their own stream (seed + this), not score learning's.
MATRIX_BATCH_SEED = 1_000_000


def phase_lengths(config, train_windows: int) -> tuple[int, int]:
    """(score steps per outer iteration, matrix steps per matrix phase) of ``config``'s schedule; for "official",
    a pass is ceil(train_windows / batch) steps and the lengths are rounded, at least 1."""
    if config.phases == "interleaved":
        return config.outer_every, config.matrix_steps
    per_pass = math.ceil(train_windows / config.batch)
    return max(1, round(config.score_passes * per_pass)), max(1, round(config.q_passes * per_pass))


def random_p0(seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """The official p̂_0 at start: U(0, 1) entries normalised per position, (L, V) float64, seeded by ``seed``."""
    p = torch.rand(seq_len, vocab_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return p / p.sum(-1, keepdim=True)


class OuterLoop:
    """After every ``score_steps``-th score step (not the last), re-estimate p̂_0 with the EMA network, then run a
    matrix phase (``matrix_phase``, also run once before score learning by ``train_dmb``).  Each phase appends a
    record to ``history`` (the step it followed, its length, the last prior KL, for "bound" the phase's mean
    bound, and the mean rates into the last rank and into the others); optimizer, step count and history are
    checkpointed.  Everything runs on the model's device."""

    def __init__(self, model, ema, data, config) -> None:
        self.model, self.ema, self.data, self.config = model, ema, data, config
        self.mu_hat = data.histogram().to(model.device)
        self.score_steps, self.matrix_steps = phase_lengths(config, data.train_windows)
        self.batches = data.batch_fn(config.batch, config.seed + MATRIX_BATCH_SEED, model.device)
        self.optimizer = torch.optim.AdamW([model.rates.raw], lr=config.matrix_lr,
                                           weight_decay=config.matrix_weight_decay)
        self.updates = 0  # matrix steps so far: the index of the next bound batch
        self.history: list[dict[str, float]] = []

    def matrix_step(self) -> dict[str, float]:
        """One AdamW step on the matrix objective; returns its values in nats per sequence."""
        model = self.model
        if self.config.q_objective == "bound":
            x0 = self.batches(self.updates, 0, 1)
            result = matrix_bound_loss(model.net, model.rates, model.noise, x0, self.mu_hat, model.p0_hat,
                                       model.total_noise_T)
            loss, values = result.surrogate, {"matrix_kl": result.prior, "matrix_bound": result.bound}
        else:
            loss = matrix_loss(model.rates, self.mu_hat, model.p0_hat, model.total_noise_T)
            values = {"matrix_kl": loss.item()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([model.rates.raw], MATRIX_CLIP)
        self.optimizer.step()
        self.updates += 1
        return values

    def matrix_phase(self, after_step: int) -> None:
        """``matrix_steps`` matrix steps (network untouched), recorded in ``history`` as following ``after_step``."""
        values = [self.matrix_step() for _ in range(self.matrix_steps)]
        self.model.rates.raw.grad = None  # keep the loop's clipping of the network free of a stale rate gradient
        a = self.model.rates.rates().detach()
        record = {"after_step": after_step, "matrix_steps": self.matrix_steps, "matrix_kl": values[-1]["matrix_kl"],
                  "rate_into_last": a[:, -1].mean().item(), "rate_into_others": a[:, :-1].mean().item()}
        if "matrix_bound" in values[-1]:
            record["matrix_bound"] = sum(v["matrix_bound"] for v in values) / len(values)
        self.history.append(record)

    @torch.no_grad()
    def estimate_p0(self) -> None:
        """p̂_0 from Euler samples of the EMA network (the config's ``p0_sampling``: sequences × steps), pooled
        over exchangeable positions and smoothed (interleaved), or per position and unsmoothed (official)."""
        net = self.model.net
        was_training = net.training
        net.eval()
        try:
            with self.ema.applied():
                result = reverse_sample(net, self.model.rates, self.model.noise, self.model.prior(),
                                        *self.config.p0_sampling)
        finally:
            net.train(was_training)
        official = self.config.phases == "official"
        self.model.p0_hat.copy_(estimate_p0(result.last_probs, self.data.shared_positions and not official,
                                            smoothed=not official))

    def after_step(self, step: int) -> None:
        done = step + 1
        if done % self.score_steps == 0 and done < self.config.steps:
            self.estimate_p0()
            self.matrix_phase(done)

    def metrics(self) -> dict[str, float]:
        last = self.history[-1] if self.history else {"matrix_kl": math.nan}
        return {k: last[k] for k in ("matrix_kl", "matrix_bound") if k in last}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads the state of slimrate versions before the phase history ({"optimizer", "last_kl"}, interleaved
        schedule only): the matrix step count comes from AdamW's own, the history starts empty (warned)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if "updates" in state:
            self.updates = int(state["updates"])
            self.history = [dict(record) for record in state["history"]]
            return
        steps = [int(s["step"]) for s in self.optimizer.state_dict()["state"].values()]
        self.updates, self.history = (steps[0] if steps else 0), []
        warnings.warn("this checkpoint was written before DMB runs kept a matrix-phase history: the run resumes, "
                      "and dmb.json's history lists only the phases after this point", stacklevel=2)

"""Training speed of the Discrete Markov Bridge: one step of each phase on the DMB study's settings.

Groups "dmb-<phase>-<model>-B<batch>-L<seq_len>", rows:
- native: slimrate.ops' fused CTMC kernels (transition rows, score entropy) under the step;
- eager:  the same step with SLIMRATE_BACKEND=reference, i.e. DMB's op chain in plain PyTorch (what the official
          code computes: one_hot → gather → cumsum → exp → diff → gather, the dense ratio and its scatter).
Phases: "score" is one score-learning step of the `small` DDiT net on the embedded corpus (forward, DWDSE,
backward, gradient clipping, AdamW), steps/s = 1 / median; "matrix" is one matrix-learning step (the exact KL over
μ̂, backward to the rates, AdamW).  Each step's loss is checked equal across the two rows before timing.
"""

from __future__ import annotations

import pytest
import torch

from slimrate.dmb.data import load_token_data
from slimrate.dmb.driver import DMBConfig, build_model
from slimrate.dmb.losses import matrix_loss

BATCH, SEQ_LEN, MODEL = 32, 64, "small"  # the study's defaults (slimrate.studies.dmb)
ROUNDS = 20


def make_model():
    data = load_token_data("text8", SEQ_LEN)
    model = build_model(DMBConfig(out_dir="unused", method="dmb", model=MODEL, batch=BATCH, seq_len=SEQ_LEN), data)
    return model, data


def score_step(model, x0: torch.Tensor, optimizer: torch.optim.Optimizer, seed: int) -> float:
    """One score-learning step on x0 with the times and x_t drawn from ``seed`` (so both rows do the same work)."""
    torch.manual_seed(seed)
    loss = model(x0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def matrix_step(model, mu_hat: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    loss = matrix_loss(model.rates, mu_hat, model.p0_hat, model.total_noise_T)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def use_backend(monkeypatch, backend: str) -> None:
    if backend == "eager":
        monkeypatch.setenv("SLIMRATE_BACKEND", "reference")
    else:
        monkeypatch.delenv("SLIMRATE_BACKEND", raising=False)


@pytest.mark.parametrize("backend", ["native", "eager"])
def test_score_step(benchmark, monkeypatch, backend):
    model, data = make_model()
    x0 = data.batch_fn(BATCH, 0)(0, 0, 1)
    first = {}
    for name in ("native", "eager"):  # same weights and draws: the losses must agree
        use_backend(monkeypatch, name)
        torch.manual_seed(1)
        first[name] = model(x0).item()
    assert first["native"] == pytest.approx(first["eager"], rel=1e-4)
    use_backend(monkeypatch, backend)
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=1e-3)
    seeds = iter(range(10**6))
    benchmark.group = f"dmb-score-{MODEL}-B{BATCH}-L{SEQ_LEN}"
    benchmark.extra_info.update(backend=backend, parameters=sum(p.numel() for p in model.net.parameters()))
    benchmark.pedantic(lambda: score_step(model, x0, optimizer, next(seeds)), rounds=ROUNDS, warmup_rounds=2)
    benchmark.extra_info["steps_per_s"] = 1.0 / benchmark.stats.stats.median


@pytest.mark.parametrize("backend", ["native", "eager"])
def test_matrix_step(benchmark, monkeypatch, backend):
    model, data = make_model()
    mu_hat = data.histogram()
    losses = {}
    for name in ("native", "eager"):
        use_backend(monkeypatch, name)
        losses[name] = matrix_loss(model.rates, mu_hat, model.p0_hat, model.total_noise_T).item()
    assert losses["native"] == pytest.approx(losses["eager"], rel=1e-9)
    use_backend(monkeypatch, backend)
    optimizer = torch.optim.AdamW([model.rates.raw], lr=1e-3, weight_decay=1e-2)
    benchmark.group = f"dmb-matrix-{MODEL}-B{BATCH}-L{SEQ_LEN}"
    benchmark.extra_info.update(backend=backend)
    benchmark.pedantic(lambda: matrix_step(model, mu_hat, optimizer), rounds=ROUNDS, warmup_rounds=2)
    benchmark.extra_info["steps_per_s"] = 1.0 / benchmark.stats.stats.median

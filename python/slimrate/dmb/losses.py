"""DMB's two objectives (docs/dmb.md §5–§6) and the sampling they need.

- Score learning: the diffusion-weighted denoising score entropy (DWDSE, SEDD eq. 10 in row form) of
  the score network at one random time per sequence, in nats per sequence.
- Matrix learning on the prior term ("prior", the paper's eq. 5): E_{x0∼μ} KL(p_{T|0}(·|x0) ‖ p̂_0·exp(σ̄(1)Q)),
  summed over positions.  The KL factorises over positions and depends on x0 only through its per-position
  marginals, so it is computed exactly from the training histogram μ̂ (the official code averages it over
  minibatches; same expectation, no sampling noise).
- Matrix learning on the whole bound ("bound"): the DWDSE of a training batch (network held fixed) plus the
  prior term above; its gradient w.r.t. the rates is estimated without bias (``matrix_bound_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimrate.dmb.noise import Noise

# t ~ U(T_MIN, 1) in training: SEDD's sampling_eps (the DMB code uses 1e-10; docs/dmb.md §11).
TRAIN_T_MIN = 1e-3
# Probabilities are clamped here before a log: zeros in p_{T|0} are structural (ranks below x0's), and
# clamping (instead of the official code's (p + ε)/Σ smoothing) keeps the KL and its gradient finite
# without moving mass.
PROB_FLOOR = 1e-30


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of unnormalised non-negative ``probs`` (..., V) by the exponential race
    argmax p_v / E_v, E_v ~ Exp(1) (SEDD catsample.py); a zero-probability state is never drawn.
    The uniforms come from ``generator`` on its own device (a seeded CPU generator gives the same draws for
    probs on any device), else from probs' device's default generator."""
    source = probs.device if generator is None else generator.device
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64, device=source).to(probs.device)
    race = -torch.log1p(-u)  # Exp(1), finite since u < 1
    return (probs.double() / race).argmax(-1)


def sample_times(n: int, t_min: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """n times in (t_min, 1], float64 on ``device``: t = 1 − (1 − t_min)·U (never exactly t_min, where σ̄ may be
    0).  U is drawn on the CPU (``generator``, else torch's default one) whatever the device, so the times of a
    seed are the same on every device."""
    return (1 - (1 - t_min) * torch.rand(n, generator=generator, dtype=torch.float64)).to(device)


def score_entropy_at(net, rates, noise: Noise, x0: torch.Tensor, t: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """DWDSE (B,) in nats per sequence at times t (B,): x_t ~ p_{t|0}(·|x0), logscore = net(x_t, σ̄(t))."""
    h, sigma = noise.total(t), noise.rate(t)
    with torch.no_grad():
        x_t = sample_categorical(rates.transition_rows(x0, h), generator)
    logscore = net(x_t, h.float())
    return rates.score_entropy(logscore, x_t, x0, h.float(), sigma.float())


def score_loss(net, rates, noise: Noise, x0: torch.Tensor, t_min: float = TRAIN_T_MIN) -> torch.Tensor:
    """Score learning's loss: the batch mean of the DWDSE at one random t per sequence, nats/sequence."""
    return score_entropy_at(net, rates, noise, x0, sample_times(x0.shape[0], t_min, device=x0.device)).mean()


def row_kl(rows: torch.Tensor, p_T: torch.Tensor) -> torch.Tensor:
    """Σ_{l,y} rows·log(rows / p_T) for rows (..., L, V) against p_T (L, V): (...) nats."""
    log_ratio = torch.log(rows.clamp_min(PROB_FLOOR)) - torch.log(p_T.clamp_min(PROB_FLOOR))
    return (rows * log_ratio).sum(dim=(-2, -1))


def prior_kl(rates, x0: torch.Tensor, p_T: torch.Tensor, h_T: float) -> torch.Tensor:
    """KL(p_{T|0}(·|x0) ‖ p_T) per sequence (B,) in nats, summed over positions (the ELBO's prior term)."""
    h = torch.full((x0.shape[0],), float(h_T), dtype=torch.float64, device=x0.device)
    return row_kl(rates.transition_rows(x0, h), p_T)


def matrix_loss(rates, mu_hat: torch.Tensor, p0_hat: torch.Tensor, h_T: float) -> torch.Tensor:
    """J_Q = E_{x0∼μ̂} KL(p_{T|0}(·|x0) ‖ p̂_0·exp(h_T·Q)) in nats per sequence (docs/dmb.md §6, eq. 5).

    mu_hat, p0_hat (L, V).  Exact over μ̂: rows of every state v at every position, weighted by μ̂[l, v].
    Gradients reach the rates through both the rows and the prediction, as in the official code.
    """
    L, V = mu_hat.shape
    p_T = rates.push_forward(p0_hat, h_T)  # (L, V)
    states = torch.arange(V, device=mu_hat.device).expand(L, V).t().contiguous()  # (V, L): state v everywhere
    h = torch.full((V,), float(h_T), dtype=torch.float64, device=mu_hat.device)
    rows = rates.transition_rows(states, h)  # (V, L, V)
    log_ratio = torch.log(rows.clamp_min(PROB_FLOOR)) - torch.log(p_T.clamp_min(PROB_FLOOR))
    kl = (rows * log_ratio).sum(-1)  # (V, L)
    return (mu_hat.t().double() * kl).sum()


@dataclass
class BoundLoss:
    """One matrix step on the whole bound: ``surrogate`` (a scalar to backpropagate; its value means nothing, its
    gradient w.r.t. the rates is an unbiased estimate of the bound's), and the two terms of the bound, detached,
    in nats per sequence: ``score`` (the batch mean of the DWDSE) and ``prior`` (``matrix_loss``)."""

    surrogate: torch.Tensor
    score: float
    prior: float

    @property
    def bound(self) -> float:
        return self.score + self.prior


def matrix_bound_loss(net, rates, noise: Noise, x0: torch.Tensor, mu_hat: torch.Tensor, p0_hat: torch.Tensor,
                      h_T: float, t: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> BoundLoss:
    """Matrix learning on the bound E_{t, x_t} DWDSE(x0) + J_Q for a training batch x0 (B, L), B ≥ 2, with the
    network held fixed (evaluated without gradient, as score learning sees it: current weights, train mode).

    t (B,): one time per sequence, default U(TRAIN_T_MIN, 1) as in score learning.  x_t ~ p_{t|0}(·|x0; Q)
    depends on Q, so ∇_Q E[f(x_t; Q)] = E[∇_Q f] + E[f·∇_Q log p(x_t|x0; Q)]: the pathwise part (the weights
    σ·Q[y, x_t] and the ratios r_y inside the DWDSE at fixed x_t) plus the score-function part, here with a
    leave-one-out baseline b_i = mean of f over the other rows (independent of row i, so still unbiased, and
    it removes most of the variance of f ≈ its mean).  Without the second part the gradient is biased: it
    ignores that moving the rates moves where x_t lands.  The prior term is ``matrix_loss`` (exact over μ̂).
    """
    B = x0.shape[0]
    if B < 2:
        raise ValueError(f"x0: expected a batch of >= 2 sequences (the leave-one-out baseline needs two), got {B}")
    if t is None:
        t = sample_times(B, TRAIN_T_MIN, generator, x0.device)
    h, sigma = noise.total(t), noise.rate(t)
    rows = rates.transition_rows(x0, h)  # (B, L, V), differentiable in the rates
    x_t = sample_categorical(rows.detach(), generator)
    with torch.no_grad():
        logscore = net(x_t, h.float())
    dwdse = rates.score_entropy(logscore, x_t, x0, h, sigma, rate_grad=True).double()  # (B,) pathwise
    log_p = torch.log(rows.gather(-1, x_t[..., None])).sum((1, 2))  # (B,) log p(x_t|x0; Q), > −inf: drawn from rows
    f = dwdse.detach()
    baseline = (f.sum() - f) / (B - 1)
    prior = matrix_loss(rates, mu_hat, p0_hat, h_T)
    surrogate = dwdse.mean() + ((f - baseline) * log_p).mean() + prior
    return BoundLoss(surrogate=surrogate, score=f.mean().item(), prior=prior.item())

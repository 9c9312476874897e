"""Reverse-time sampling (docs/dmb.md §8) and DMB's p̂_0 estimate.

- "euler" (DMB's only sampler, and SEDD's Euler): x ~ δ_{x_t} + Δt·Q̂(x_t, ·) with the reverse rates
  Q̂[x, y] = s_θ(x)_y·σ(t)·Q[y, x] and the diagonal −Σ; negative entries (a step too long for the rate)
  are clamped to 0, which is what the exponential race does with them in both official codes.
- "analytic" (SEDD's Tweedie τ-leaping, the fixed-Q baselines only): p(x_s|x_t) ∝
  (s·exp(−ΔσQ))_y·exp(ΔσQ)[y, x_t], Δσ = σ̄(t) − σ̄(s), from ``rates.tweedie_probs``.
The baselines end with SEDD's denoising step (an analytic step from t_min to 0, [MASK] excluded), so
every returned token is a data token; DMB has no [MASK] and ends after the last Euler step, as its code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimrate.dmb.losses import sample_categorical
from slimrate.dmb.noise import Noise

SAMPLE_T_MIN = 1e-5  # SEDD's sampling eps
SAMPLERS = ("euler", "analytic")


@dataclass
class SampleResult:
    """tokens (n, L) int64 data tokens; last_probs (n, L, V) float64, the (clamped, unnormalised)
    probabilities of the last Euler step, from which DMB estimates p̂_0."""

    tokens: torch.Tensor
    last_probs: torch.Tensor


@torch.no_grad()
def reverse_sample(net, rates, noise: Noise, p_T: torch.Tensor, n: int, steps: int, method: str = "euler",
                   generator: torch.Generator | None = None, t_min: float = SAMPLE_T_MIN) -> SampleResult:
    """Draw ``n`` sequences: x_1 ~ p_T (L, V) per position, then ``steps`` reverse steps from t = 1 to t_min."""
    if method not in SAMPLERS:
        raise ValueError(f"method: expected one of {SAMPLERS}, got {method!r}")
    tweedie = getattr(rates, "tweedie_probs", None)
    if method == "analytic" and tweedie is None:
        raise ValueError("method: 'analytic' needs a fixed forward process with a closed-form exp(ΔσQ) "
                         "(sedd-absorb or sedd-uniform); DMB samples with 'euler'")
    if n < 1 or steps < 1:
        raise ValueError(f"n, steps: expected >= 1, got {n}, {steps}")
    L, V = p_T.shape
    x = sample_categorical(p_T.expand(n, L, V), generator)  # (n, L)
    times = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64, device=p_T.device)
    dt = (1.0 - t_min) / steps
    probs = F.one_hot(x, V).double()
    for i in range(steps):
        t = times[i].expand(n)
        h = noise.total(t)
        score = net(x, h.float()).double().exp()  # (n, L, V)
        if method == "euler":
            rev = score * rates.rate_cols(x) * noise.rate(t)[:, None, None]
            rev = rev.scatter(-1, x[..., None], 0.0)
            rev = rev.scatter(-1, x[..., None], -rev.sum(-1, keepdim=True))
            probs = (F.one_hot(x, V).double() + dt * rev).clamp_min(0.0)
        else:
            probs = tweedie(score, x, h - noise.total(times[i + 1].expand(n)))
        x = sample_categorical(probs, generator)
    if tweedie is not None:  # SEDD's final denoising step, t_min → 0
        h = noise.total(times[-1].expand(n))
        probs = tweedie(net(x, h.float()).double().exp(), x, h)
        if rates.mask_index is not None:
            probs[..., rates.mask_index] = 0.0
        x = sample_categorical(probs, generator)
    return SampleResult(tokens=x, last_probs=probs)


def estimate_p0(last_probs: torch.Tensor, shared_positions: bool, smoothed: bool = True) -> torch.Tensor:
    """DMB's p̂_0 (L, V) float64 from the last sampling step (n, L, V) (official code ``pred.py``): the mean over
    samples of the step's probabilities, relu-clamped and renormalised; pooled over positions when they
    are exchangeable (text) and ``shared_positions``, and, when ``smoothed``, mixed with one uniform
    pseudo-sample so no state gets probability 0 (a zero makes the prior KL of a sequence holding that state
    large: the KL clamps p_T at 1e-30).  The official code neither pools nor smooths."""
    p = last_probs.double().clamp_min(0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)  # (n, L, V)
    n, L, V = p.shape
    mean = p.mean(0)
    if shared_positions:
        mean = mean.mean(0, keepdim=True).expand(L, V)
    if not smoothed:
        return mean.clone()
    samples = n * (L if shared_positions else 1)
    return (mean * samples + 1.0 / V) / (samples + 1.0)

"""The negative ELBO in bits per token (docs/dmb.md §7; SEDD Thm 3.6):

    −log p_θ(x0) ≤ ∫₀¹ DWDSE_t(x0) dt + KL(p_{1|0}(·|x0) ‖ p_T),   p_T = p̂_0·exp(σ̄(1)Q).

The time integral is estimated by Monte Carlo with ``samples`` = k times per sequence (each with its own
x_t), the prior term exactly.  The integral is taken over the total noise h = σ̄(t) (DWDSE_t dt =
(DWDSE_t/σ(t)) dh): h = σ̄(0) + (σ̄(1) − σ̄(0))·u², weighted by 2u·(σ̄(1) − σ̄(0))/σ(t).  In t, the
log-linear schedule's σ(t) grows to 1/ε at t = 1, and a chain that is not fully absorbed by then (DMB
with Q trained on the bound and the official schedule) puts ~30% of its bound in the last 3% of t,
which draws in t hit too rarely (10× the error); in h that region is half the range.  u² keeps the
variance finite near h = 0, where a rare jump of x_t away from x0 (probability ~h) carries a term ~1/h
(uniform draws have a logarithmically infinite variance there).  u is stratified: the k times of a
sequence are two uniform draws in each of m = k/2 equal strata of (0, 1].  Bits per token = nats /
(L·ln 2): bits per character for text.  The standard error is that of the Monte Carlo estimate for the
fixed evaluation set, sqrt(Σ_i Σ_j s_ij² / (2m²)) / N from the sample variance s_ij² of the two draws in
stratum j of sequence i.
The bound is exact (no reconstruction term) when σ̄(0) = 0, as for the log-linear schedule; with the
geometric schedule σ̄(0) = σ_min and the term for the noise already present at t = 0 is left out.

``official_bits`` is the DMB authors' test loss instead (arXiv:2505.19752, their ``evaluate``; docs/dmb.md §7):
one t ~ U(ε, 1] per sequence (ε = 10⁻¹⁰, their default), the DWDSE plus the prior KL averaged over the
sequences, repeated; its standard error is the spread of the repeats.  Both estimate the same integral
(they differ by the ∫₀^ε part, ~ε), so on one model they agree within their standard errors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from slimrate.dmb.losses import prior_kl, sample_times, score_entropy_at
from slimrate.dmb.noise import Noise

LN2 = math.log(2)
# The official evaluation's time floor and repeat count (their --eps and --eval_times defaults).
OFFICIAL_T_MIN = 1e-10
OFFICIAL_REPEATS = 20


@dataclass
class ElboResult:
    """bits_per_token: the bound; standard_error: its Monte Carlo standard error; score_bits and
    prior_bits: the two terms; sequences × samples: the evaluation set and times per sequence."""

    bits_per_token: float
    standard_error: float
    score_bits: float
    prior_bits: float
    sequences: int
    samples: int

    def __str__(self) -> str:
        return (f"{self.bits_per_token:.4f} ± {self.standard_error:.4f} bits/token (MC standard error; "
                f"{self.sequences} sequences × {self.samples} times t; score term {self.score_bits:.4f}, "
                f"prior term {self.prior_bits:.4f})")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def elbo_bits(net, rates, noise: Noise, p_T: torch.Tensor, x0: torch.Tensor, samples: int = 4, batch: int = 64,
              generator: torch.Generator | None = None) -> ElboResult:
    """The bound for the sequences x0 (N, L) int64 with ``samples`` (even, ≥ 2) times each, two in each of
    samples/2 strata of u, σ̄(t) = σ̄(0) + (σ̄(1) − σ̄(0))·u² (module docstring), ``batch`` rows per call."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2 or samples % 2:
        raise ValueError(f"samples: expected an even int >= 2 (two times in each of samples/2 strata of t; the "
                         f"standard error needs the pairs), got {samples!r}")
    N, L = x0.shape
    if N < 1:
        raise ValueError("x0: expected at least one sequence")
    h_0, h_T = (float(noise.total(torch.tensor(t, dtype=torch.float64))) for t in (0.0, 1.0))
    strata = samples // 2
    score_means, pair_vars, priors = [], [], []
    per_call = max(1, batch // samples)
    for chunk in x0.split(per_call):
        b = chunk.shape[0]
        repeated = chunk.repeat_interleave(samples, dim=0)  # (b·k, L)
        lower = torch.arange(strata, dtype=torch.float64, device=x0.device).repeat_interleave(2).repeat(b)
        u = (lower + sample_times(b * samples, 0.0, generator, x0.device)) / strata  # stratum j: (j/m, (j+1)/m]
        t = noise.time_at(h_0 + (h_T - h_0) * u * u).clamp(max=1.0)  # σ̄(t) = h_0 + (h_T − h_0)·u²
        dwdse = score_entropy_at(net, rates, noise, repeated, t, generator).double()
        values = (2 * u * (h_T - h_0) * dwdse / noise.rate(t)).view(b, strata, 2)
        score_means.append(values.mean((1, 2)))
        pair_vars.append(values.var(2).sum(1))  # Σ_j s_ij²
        priors.append(prior_kl(rates, chunk, p_T, h_T))
    score, var, prior = torch.cat(score_means), torch.cat(pair_vars), torch.cat(priors)
    scale = 1.0 / (L * LN2)
    return ElboResult(bits_per_token=float((score + prior).mean()) * scale,
                      standard_error=math.sqrt(float(var.sum()) / (2 * strata**2)) / N * scale,
                      score_bits=float(score.mean()) * scale, prior_bits=float(prior.mean()) * scale,
                      sequences=N, samples=samples)


@dataclass
class OfficialResult:
    """The official protocol's estimate: bits_per_token (mean over ``repeats`` passes over the sequences, one
    uniform t each) ± standard_error (sample SD of the passes / √repeats); score_bits and prior_bits: the two
    terms; per_repeat: each pass's value in bits/token."""

    bits_per_token: float
    standard_error: float
    score_bits: float
    prior_bits: float
    sequences: int
    repeats: int
    per_repeat: list[float]

    def __str__(self) -> str:
        return (f"{self.bits_per_token:.4f} ± {self.standard_error:.4f} bits/token (SE over {self.repeats} repeats "
                f"of one uniform t per sequence; {self.sequences} sequences; score term {self.score_bits:.4f}, "
                f"prior term {self.prior_bits:.4f})")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def official_bits(net, rates, noise: Noise, p_T: torch.Tensor, x0: torch.Tensor, repeats: int = OFFICIAL_REPEATS,
                  batch: int = 64, generator: torch.Generator | None = None) -> OfficialResult:
    """The DMB authors' test loss for the sequences x0 (N, L) int64: ``repeats`` ≥ 2 passes, each the mean over
    the sequences of DWDSE at one t ~ U(OFFICIAL_T_MIN, 1] plus the prior KL, ``batch`` rows per call."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats: expected an int >= 2 (the standard error needs two passes), got {repeats!r}")
    N, L = x0.shape
    if N < 1:
        raise ValueError("x0: expected at least one sequence")
    h_T = float(noise.total(torch.tensor(1.0, dtype=torch.float64)))
    prior = torch.cat([prior_kl(rates, chunk, p_T, h_T) for chunk in x0.split(batch)]).mean()  # exact: no t
    scores = []
    for _ in range(repeats):
        per_sequence = [score_entropy_at(net, rates, noise, chunk, sample_times(chunk.shape[0], OFFICIAL_T_MIN,
                                                                                generator, x0.device),
                                         generator).double()
                        for chunk in x0.split(batch)]
        scores.append(torch.cat(per_sequence).mean())
    score = torch.stack(scores)  # (repeats,) nats per sequence
    scale = 1.0 / (L * LN2)
    values = (score + prior) * scale
    return OfficialResult(bits_per_token=float(values.mean()),
                          standard_error=float(values.std()) / math.sqrt(repeats),
                          score_bits=float(score.mean()) * scale, prior_bits=float(prior) * scale,
                          sequences=N, repeats=repeats, per_repeat=values.tolist())

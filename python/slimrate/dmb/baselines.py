"""SEDD's fixed forward processes (Lou, Meng, Ermon 2024; docs/dmb.md §10) behind the same interface as
``RateMatrix``, so the baselines share DMB's model, losses, sampler, ELBO and budget.

- ``AbsorbingRates``: SEDD-absorb.  V data states plus [MASK] (index V, the last rank), unit rate into
  [MASK]: exactly a frozen ``RateMatrix`` with the identity permutation and a = (0, …, 0, 1), so its
  rows, columns and score entropy go through the same ``slimrate.ops`` kernels as DMB.
- ``UniformRates``: SEDD-uniform, Q = (11ᵀ − N·I)/N.  Not triangular in any order, so it has its own
  closed forms (SEDD ``graph_lib.Uniform``).

Both add ``tweedie_probs``: SEDD's analytic ("Tweedie τ-leaping") reverse step.
"""

from __future__ import annotations

import torch
from torch import nn

from slimrate.dmb.rate_matrix import RateMatrix, check_distribution, check_tokens, check_total_noise

# SEDD's expm1 switch (graph_lib.py): expm1 below 0.5, exp(σ) − 1 above, both accurate there.
EXPM1_SWITCH = 0.5


def esigm1(h: torch.Tensor) -> torch.Tensor:
    """e^h − 1, accurate for small and large h."""
    return torch.where(h < EXPM1_SWITCH, torch.expm1(h), torch.exp(h) - 1)


class AbsorbingRates(RateMatrix):
    """SEDD-absorb over ``data_vocab`` tokens + [MASK] = index ``data_vocab``; frozen (no parameters)."""

    def __init__(self, data_vocab: int, seq_len: int) -> None:
        V = data_vocab + 1
        perm = torch.arange(V).expand(seq_len, V)
        rates = torch.zeros(seq_len, V - 1, dtype=torch.float64)
        rates[:, -1] = 1.0
        super().__init__(perm, rates, learnable=False)

    @property
    def mask_index(self) -> int:
        return self.vocab_size - 1

    def tweedie_probs(self, score: torch.Tensor, x: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """Unnormalised p(x_s = y | x_t = x) ∝ (s·exp(−ΔσQ))_y · exp(ΔσQ)[y, x] (SEDD ``analytic`` step).

        score (B, L, V) = exp(logscore) ≥ 0, x (B, L), dsigma (B,) = σ̄(t) − σ̄(s) ≥ 0 → (B, L, V).
        Staggered score: s·e^{Δσ} off [MASK], s_M + (1 − e^{Δσ})·Σ_{z≠M} s_z at [MASK]; the transition
        column is e^{−Δσ}·δ_x for a data token x and (1 − e^{−Δσ}, …, 1) for x = [MASK].
        """
        M = self.mask_index
        d = dsigma.to(score.dtype)[:, None, None]
        stag = score * torch.exp(d)
        stag[..., M] += ((1 - torch.exp(d[..., 0])) * score.sum(-1))
        col = torch.exp(-d) * nn.functional.one_hot(x, self.vocab_size).to(score.dtype)
        col = col + torch.where(x == M, 1 - torch.exp(-d[..., 0]), torch.zeros_like(d[..., 0]))[..., None]
        return stag * col


class UniformRates(nn.Module):
    """SEDD-uniform over N = ``vocab_size`` states, the same at every position: Q = (11ᵀ − N·I)/N."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        if vocab_size < 2 or seq_len < 1:
            raise ValueError(f"vocab_size, seq_len: expected >= 2 and >= 1, got {vocab_size}, {seq_len}")
        self._vocab, self._seq_len = vocab_size, seq_len

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def mask_index(self) -> None:
        return None

    def transition_rows(self, x0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """exp(hQ)[x0, ·] = e^{−h}·δ_{x0} + (1 − e^{−h})/N, (B, L, V) float64."""
        check_tokens("x0", x0, self._vocab, self._seq_len)
        check_total_noise("h", h, x0.shape[0])
        stay = torch.exp(-h.double())[:, None, None]
        return stay * nn.functional.one_hot(x0.long(), self._vocab).double() + (1 - stay) / self._vocab

    def rate_cols(self, x: torch.Tensor) -> torch.Tensor:
        """Q[y, x]: 1/N for y ≠ x, −(N−1)/N at y = x, (B, L, V) float64."""
        check_tokens("x", x, self._vocab, self._seq_len)
        N = self._vocab
        return (torch.full((*x.shape, N), 1.0 / N, dtype=torch.float64, device=x.device)
                - nn.functional.one_hot(x.long(), N).double())

    def score_entropy(self, logscore: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, h: torch.Tensor,
                      sigma: torch.Tensor) -> torch.Tensor:
        """DWDSE per sequence (B,) in nats, SEDD's closed form (``Uniform.score_entropy``) times σ(t).

        With ρ = esm1/(esm1 + N), esm1 = e^h − 1, the ratios r_y are ρ for every y ≠ x_t when
        x_t = x0, else 1 + N/esm1 at y = x0 and 1 elsewhere; the constant term is Σ r(log r − 1)/N.
        """
        check_tokens("x_t", x_t, self._vocab, self._seq_len)
        check_tokens("x0", x0, self._vocab, self._seq_len)
        check_total_noise("h", h, x0.shape[0])
        N = self._vocab
        # the h-only factors in float64, ρ as esm1/(esm1 + N): SEDD's 1 − N/(esm1 + N) rounds to 0 in float32
        # once σ̄ < ~1e-6, and ρ = 0 makes the constant term NaN
        esm1 = esigm1(h.double())[:, None]  # (B, 1)
        rho = esm1 / (esm1 + N)
        s_x = logscore.gather(-1, x_t.unsqueeze(-1)).squeeze(-1)  # (B, L)
        s_x0 = logscore.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        same = x_t == x0
        neg = logscore.mean(-1) - s_x / N
        neg = torch.where(same, rho.to(neg.dtype) * neg, s_x0 / esm1.to(neg.dtype) + neg)
        const = torch.where(same, (N - 1) / N * rho * (torch.log(rho) - 1), ((-torch.log(rho) - 1) / rho - (N - 2)) / N)
        sexp = logscore.exp()
        pos = sexp.mean(-1) - sexp.gather(-1, x_t.unsqueeze(-1)).squeeze(-1) / N
        return sigma.to(logscore.dtype) * (pos - neg + const.to(pos.dtype)).sum(-1)

    def push_forward(self, p0: torch.Tensor, h: float | torch.Tensor) -> torch.Tensor:
        """p0·exp(hQ) = e^{−h}·p0 + (1 − e^{−h})/N, (L, V) float64."""
        check_distribution("p0", p0, (self._seq_len, self._vocab))
        h = torch.as_tensor(h, dtype=torch.float64)
        if not (torch.isfinite(h) and h >= 0):
            raise ValueError(f"h: expected a finite total noise >= 0, got {h.item()}")
        return torch.exp(-h) * p0.double() + (1 - torch.exp(-h)) / self._vocab

    def tweedie_probs(self, score: torch.Tensor, x: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """SEDD's analytic step for the uniform chain: staggered score e^{Δσ}·s + (1 − e^{Δσ})/N·Σs times the
        (symmetric) transition column e^{−Δσ}·δ_x + (1 − e^{−Δσ})/N; (B, L, V) unnormalised."""
        N = self._vocab
        d = dsigma.to(score.dtype)[:, None, None]
        stag = torch.exp(d) * score + (1 - torch.exp(d)) / N * score.sum(-1, keepdim=True)
        stay = torch.exp(-d)
        col = stay * nn.functional.one_hot(x.long(), N).to(score.dtype) + (1 - stay) / N
        return stag * col


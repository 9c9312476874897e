"""DMB's learnable per-position rate matrix Q_α = A·H·A⁻¹ (docs/dmb.md §3).

At each position l, A is a permutation and H is upper triangular in rank order: the rate from rank i
to rank j > i is a_{j−1} ≥ 0 (it depends only on the target), the diagonal is Λ_k = −Σ_{i≥k} a_i and
the last rank absorbs (Λ_{V−1} = 0).  So exp(hQ) = (AU)·exp(hΛ)·(AU)⁻¹ with U the all-ones upper
triangle, and every operator below costs O(V) per row; no V×V matrix is formed.

Conventions (docs/dmb.md §2): row vectors; ``perm[l, x]`` is the rank of state x at position l and
``perm_inv[l, k]`` the state at rank k; ``lam [L, V]`` is Λ in rank order; h = σ̄(t), sigma = σ(t).
The rows, columns and the score entropy come from ``slimrate.ops`` (``ctmc_transition_rows``,
``ctmc_rate_cols``, ``score_entropy``); p_0·exp(hQ) for a whole distribution is computed here in plain
PyTorch (the same gather → cumsum → ·exp(hΛ) → diff → gather chain, with autograd).
"""

from __future__ import annotations

import torch
from torch import nn

from slimrate import ops

RATE_INITS = ("gather", "constant", "prior-matching")
# Added to every a_i at init, as the official code does (docs/dmb.md §3): a = relu(param) has a
# zero gradient at exactly 0, so a rate that starts at 0 could never grow.
INIT_FLOOR = 1e-10
# Lemma 4.4's smoothing of the ratio prior/μ̂ (official code, m_permute).
RATIO_EPS = 1e-15


def check_distribution(name: str, p: torch.Tensor, shape: tuple[int, int]) -> None:
    """ValueError unless ``p`` is a float tensor of ``shape`` with non-negative rows summing to 1."""
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor, got {type(p).__name__} "
                        f"{getattr(p, 'dtype', '')}")
    if tuple(p.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} (positions × states), got {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name}: expected finite non-negative probabilities, got min {p.min().item():.3g}")
    sums = p.sum(-1, dtype=torch.float64)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        raise ValueError(f"{name}: expected rows summing to 1, got sums in [{sums.min():.6g}, {sums.max():.6g}]")


def check_tokens(name: str, x: torch.Tensor, vocab_size: int, seq_len: int) -> None:
    """ValueError unless ``x`` is an int64 (B, seq_len) tensor of ids in [0, vocab_size)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor of token ids, got {getattr(x, 'dtype', type(x))}; "
                        "convert with .long()")
    if x.dim() != 2 or x.shape[1] != seq_len:
        raise ValueError(f"{name}: expected shape (batch, {seq_len}), got {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() >= vocab_size):
        raise ValueError(f"{name}: expected token ids in [0, {vocab_size}), got min {int(x.min())} "
                         f"max {int(x.max())}")


def check_total_noise(name: str, h: torch.Tensor, batch: int) -> None:
    """ValueError unless ``h`` is a finite (batch,) float tensor ≥ 0."""
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or tuple(h.shape) != (batch,):
        raise ValueError(f"{name}: expected a float tensor of shape ({batch},), got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError(f"{name}: expected finite values >= 0 (total noise σ̄(t)), got min {h.min().item():.3g}")


def data_permutation(mu_hat: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lemma 4.4's per-position order: ranks by (prior + ε)/(μ̂ + ε) ascending (docs/dmb.md §3).

    mu_hat (L, V) per-position data histogram (rows sum to 1); prior (L, V), default uniform 1/V.
    Returns (perm, perm_inv), both (L, V) int64: perm[l, x] the rank of state x, perm_inv[l, k] the
    state at rank k.  Rank 0 is the most frequent state, the last rank (the absorbing one) the state
    most over-represented in the prior relative to the data; ties keep state order (stable sort).
    """
    if prior is None:
        prior = torch.full_like(mu_hat, 1.0 / mu_hat.shape[-1])
    ratio = (prior.double() + RATIO_EPS) / (mu_hat.double() + RATIO_EPS)
    perm_inv = torch.argsort(ratio, dim=-1, stable=True)
    return torch.argsort(perm_inv, dim=-1), perm_inv


def initial_rates(init: str, mu_hat: torch.Tensor, perm_inv: torch.Tensor, *, h_T: float | None = None,
                  prior: torch.Tensor | None = None, value: float = 1e-5) -> torch.Tensor:
    """Initial rates a (L, V−1) float64, each ≥ INIT_FLOOR.

    - "gather" (the paper's text init): a = (0, …, 0, 1), Λ = (−1, …, −1, 0): an absorbing chain into
      the last rank at rate 1 (docs/dmb.md §3).
    - "constant": every a_i = ``value`` (the paper's image init uses 1e-5).
    - "prior-matching": Thm 4.2's accessibility construction, e^{hΛ_k} = P_k / M_k with P, M the
      cumulative prior and data histograms in rank order, so that μ̂·exp(h_T·Q) = prior exactly at
      init (``h_T`` = σ̄(1) required; the official code's "analytic" init meant this but collapses to
      0 under relu).
    """
    L, V = mu_hat.shape
    if init == "gather":
        rates = torch.zeros(L, V - 1, dtype=torch.float64)
        rates[:, -1] = 1.0
    elif init == "constant":
        if not value >= 0:
            raise ValueError(f"value: expected a rate >= 0 for init='constant', got {value!r}")
        rates = torch.full((L, V - 1), float(value), dtype=torch.float64)
    elif init == "prior-matching":
        if h_T is None or not h_T > 0:
            raise ValueError(f"h_T: init='prior-matching' needs the total noise σ̄(1) > 0, got {h_T!r}")
        if prior is None:
            prior = torch.full((L, V), 1.0 / V, dtype=torch.float64)
        p_cum = prior.double().gather(1, perm_inv).cumsum(1)
        m_cum = mu_hat.double().gather(1, perm_inv).cumsum(1)
        lam = (torch.log(p_cum.clamp_min(RATIO_EPS)) - torch.log(m_cum.clamp_min(RATIO_EPS))) / h_T
        lam = lam.clamp_max(0.0)
        lam[:, -1] = 0.0
        rates = (lam[:, 1:] - lam[:, :-1]).clamp_min(0.0)
    else:
        raise ValueError(f"init: expected one of {RATE_INITS}, got {init!r}")
    return rates + INIT_FLOOR


class RateMatrix(nn.Module):
    """Q_α at every position: rates a = relu(raw) (L, V−1) float64, permutation buffers (L, V) int64.

    ``learnable=False`` stores the rates as a buffer (the fixed-Q baselines); otherwise ``raw`` is an
    ``nn.Parameter`` trained by matrix learning.  Λ is computed in float64, as the official code does.
    """

    def __init__(self, perm: torch.Tensor, rates: torch.Tensor, *, learnable: bool = True) -> None:
        super().__init__()
        if perm.dim() != 2 or perm.shape[1] < 2:
            raise ValueError(f"perm: expected shape (L, V) with V >= 2, got {tuple(perm.shape)}")
        L, V = perm.shape
        perm = perm.long()
        if not torch.equal(perm.sort(dim=1).values, torch.arange(V, device=perm.device).expand(L, V)):
            raise ValueError("perm: expected each row to be a permutation of 0..V-1")
        if tuple(rates.shape) != (L, V - 1):
            raise ValueError(f"rates: expected shape (L, V-1) = {(L, V - 1)}, got {tuple(rates.shape)}")
        if not torch.isfinite(rates).all() or (rates < 0).any():
            bad = torch.nonzero(~(rates >= 0) | ~torch.isfinite(rates))[0].tolist()
            raise ValueError(f"rates: expected finite rates a_i >= 0 (a valid rate matrix), got "
                             f"{rates[bad[0], bad[1]].item():.3g} at position {bad[0]}, index {bad[1]}")
        self.register_buffer("perm", perm.clone())
        self.register_buffer("perm_inv", torch.argsort(perm, dim=1))
        raw = rates.detach().to(torch.float64).clone()
        if learnable:
            self.raw = nn.Parameter(raw)
        else:
            self.register_buffer("raw", raw)

    @classmethod
    def from_data(cls, mu_hat: torch.Tensor, init: str = "gather", *, h_T: float | None = None,
                  prior: torch.Tensor | None = None, value: float = 1e-5, learnable: bool = True) -> RateMatrix:
        """The paper's construction: Lemma 4.4's permutation from μ̂ (L, V), then ``initial_rates``."""
        check_distribution("mu_hat", mu_hat, tuple(mu_hat.shape))
        perm, perm_inv = data_permutation(mu_hat, prior)
        return cls(perm, initial_rates(init, mu_hat, perm_inv, h_T=h_T, prior=prior, value=value),
                   learnable=learnable)

    @property
    def seq_len(self) -> int:
        return self.perm.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.perm.shape[1]

    @property
    def mask_index(self) -> int | None:
        """The index of a [MASK] state that is never data (None: every state is a data token)."""
        return None

    def rates(self) -> torch.Tensor:
        """a = relu(raw), (L, V−1) float64, the rate into rank j+1 from any lower rank."""
        return torch.relu(self.raw)

    def lam(self) -> torch.Tensor:
        """Λ (L, V) float64 in rank order: Λ_k = −Σ_{i≥k} a_i, Λ_{V−1} = 0 (the code's get_lambda)."""
        return ops.ctmc_lambda(self.rates())

    def transition_rows(self, x0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """p_{t|0}(·|x0): rows x0 of exp(h·Q), (B, L, V) float64; x0 (B, L) int64, h (B,) ≥ 0.
        Differentiable w.r.t. the rates."""
        check_tokens("x0", x0, self.vocab_size, self.seq_len)
        check_total_noise("h", h, x0.shape[0])
        return ops.ctmc_transition_rows(x0, h.double(), self.lam(), self.perm, self.perm_inv)

    def rate_cols(self, x: torch.Tensor) -> torch.Tensor:
        """Q[y, x] for every y: the rates into x (its column), (B, L, V) float64; x (B, L) int64."""
        check_tokens("x", x, self.vocab_size, self.seq_len)
        return ops.ctmc_rate_cols(x, self.lam(), self.perm, self.perm_inv)

    def score_entropy(self, logscore: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, h: torch.Tensor,
                      sigma: torch.Tensor, *, rate_grad: bool = False) -> torch.Tensor:
        """DWDSE per sequence (B,) in nats: Σ_l Σ_{y≠x_t} σ·Q[y, x_t]·(e^{s_y} − r_y s_y + r_y(log r_y − 1)),
        r_y = p(y|x0)/p(x_t|x0) (docs/dmb.md §4).  Differentiable w.r.t. logscore (B, L, V); with
        ``rate_grad`` also w.r.t. the rates (matrix learning on the whole bound), else they are held fixed
        (score learning: no rate gradient may leak into the network's step)."""
        check_tokens("x_t", x_t, self.vocab_size, self.seq_len)
        check_tokens("x0", x0, self.vocab_size, self.seq_len)
        check_total_noise("h", h, x0.shape[0])
        lam = self.lam() if rate_grad else self.lam().detach()
        lam = lam.to(logscore.dtype)  # the op computes in logscore's dtype (float32 from the net)
        return ops.score_entropy(logscore, x_t, x0, h.to(logscore.dtype), sigma.to(logscore.dtype), lam,
                                 self.perm, self.perm_inv)

    def push_forward(self, p0: torch.Tensor, h: float | torch.Tensor) -> torch.Tensor:
        """p0·exp(h·Q) per position: p0 (L, V) → (L, V) float64 (the prior p_T = p̂_0·exp(σ̄(1)Q)).

        gather (rank order) → cumsum → ·exp(hΛ) → first difference, relu-clamped → gather back
        (docs/dmb.md §4); differentiable w.r.t. the rates (matrix learning's prediction term).
        """
        check_distribution("p0", p0, (self.seq_len, self.vocab_size))
        h = torch.as_tensor(h, dtype=torch.float64)
        if not (torch.isfinite(h) and h >= 0):
            raise ValueError(f"h: expected a finite total noise >= 0, got {h.item()}")
        cum = p0.double().gather(1, self.perm_inv).cumsum(1) * torch.exp(h * self.lam())
        rank_probs = torch.diff(cum, dim=1, prepend=torch.zeros_like(cum[:, :1])).clamp_min(0.0)
        return rank_probs.gather(1, self.perm)

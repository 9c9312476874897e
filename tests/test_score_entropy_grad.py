"""The score entropy's gradient in the rates (lam), the total noise h and the noise rate sigma (docs/dmb.md §4) on
every backend: gradcheck in float64, and against autograd through the dense matrix exponential of each position's
explicit Q, with x_t drawn from p(·|x0) so that some weighted y lie below rank(x0) (p(y|x0) = 0 for every lam and
h: finite gradients, that y adds nothing to them)."""

import pytest
import torch
from test_ctmc import BACKENDS, random_ctmc, sample_rows

from slimrate import ops

from helpers import skip_unless_backend


def dense_rate_matrices(lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Q [L, V, V] from lam by DMB's factorisation (docs/dmb.md §3): U·diag(Λ)·U⁻¹ in rank order (U the all-ones
    upper triangle), then states ordered by perm: Q[y, y'] = Q_rank[perm[y], perm[y']].  Differentiable in lam."""
    L, V = lam.shape
    U = torch.ones(V, V, dtype=lam.dtype).triu()
    q_rank = U @ torch.diag_embed(lam) @ torch.linalg.inv(U)
    rows = q_rank.gather(1, perm[:, :, None].expand(L, V, V))
    return rows.gather(2, perm[:, None, :].expand(L, V, V))


def dense_score_entropy(logscore, x_t, x0, h, sigma, lam, perm) -> torch.Tensor:
    """The loss [B] from rows of torch.linalg.matrix_exp(h·Q) and columns of the dense Q; entries y ranked below
    x0 (structurally p(y|x0) = 0) are masked by rank before the log."""
    B, L, V = logscore.shape
    q = dense_rate_matrices(lam, perm)
    p = torch.linalg.matrix_exp(h[:, None, None, None] * q)  # [B, L, V, V]
    cond = p.gather(2, x0[..., None, None].expand(B, L, 1, V)).squeeze(2)
    col = q.transpose(1, 2).expand(B, L, V, V).gather(2, x_t[..., None, None].expand(B, L, 1, V)).squeeze(2)
    rank = perm.expand(B, L, V)
    below_x0 = rank < perm.gather(1, x0.t()).t()[..., None]
    off = torch.arange(V) != x_t[..., None]
    live = off & ~below_x0
    r = torch.where(live, cond / cond.gather(-1, x_t[..., None]), 1.0)
    term = logscore.exp() + torch.where(live, r * (r.log() - 1 - logscore), 0.0)
    return (sigma[:, None, None] * torch.where(off, col, 0.0) * term).sum((1, 2))


def grad_case(B: int = 4, L: int = 3, V: int = 6):
    """float64 inputs with every rate > 0 and x_t ~ p(·|x0); at least one weighted y below rank(x0)."""
    lam, perm, perm_inv = random_ctmc(L, V)
    x0 = torch.randint(0, V, (B, L))
    h = torch.rand(B, dtype=torch.float64) * 1.5 + 0.1
    x_t = sample_rows(ops.reference.ctmc_transition_rows(x0, h, lam, perm, perm_inv))
    k, k0 = perm.gather(1, x_t.t()).t(), perm.gather(1, x0.t()).t()
    if not ((k0 > 0) & (k > k0)).any():  # then some y < rank(x0) ≤ k has a rate into x_t
        x0[0, 0], x_t[0, 0] = perm_inv[0, 1], perm_inv[0, V - 1]
    sigma = torch.rand(B, dtype=torch.float64) + 0.1
    logscore = torch.randn(B, L, V, dtype=torch.float64)
    return logscore, x_t, x0, h, sigma, lam, perm, perm_inv


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_entropy_grads_match_dense_matrix_exp(backend):
    skip_unless_backend(backend, "cpu")
    logscore, x_t, x0, h, sigma, lam, perm, perm_inv = grad_case()
    grads = []
    for fn in (lambda *a: ops.score_entropy(*a, perm_inv, backend=backend),
               lambda *a: dense_score_entropy(*a)):
        wrt = [t.clone().requires_grad_() for t in (logscore, h, sigma, lam)]
        ls, hh, sg, lm = wrt
        loss = fn(ls, x_t, x0, hh, sg, lm, perm)
        weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype)  # a grad_loss that differs per sequence
        grads.append((loss.detach(), *torch.autograd.grad((loss * weights).sum(), wrt)))
    for name, got, want in zip(("loss", "logscore", "h", "sigma", "lam"), *grads, strict=True):
        assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_entropy_gradcheck_in_rates_h_and_sigma(backend):
    """Through the rates a (lam = ctmc_lambda(a), as a model parametrises it: a perturbed lam[:, V-1] would not be
    a rate matrix), with logscore fixed (the step that trains Q) and with logscore too."""
    skip_unless_backend(backend, "cpu")
    logscore, x_t, x0, h, sigma, _, perm, perm_inv = grad_case(B=3, L=2, V=5)
    a = (torch.rand(2, 4, dtype=torch.float64) + 0.1).requires_grad_()
    h, sigma = h.requires_grad_(), sigma.requires_grad_()

    def f(a, h, sigma, ls=logscore):
        return ops.score_entropy(ls, x_t, x0, h, sigma, ops.ctmc_lambda(a), perm, perm_inv, backend=backend)

    assert torch.autograd.gradcheck(f, (a, h, sigma))
    assert torch.autograd.gradcheck(f, (a, h, sigma, logscore.clone().requires_grad_()))


def test_reference_grads_are_finite_where_no_rate_enters():
    """A zero rate a_{j-1} makes p(y|x0) = 0 above x0 too; the reference skips it like a structural zero."""
    logscore, x_t, x0, h, sigma, _, perm, perm_inv = grad_case()
    a = torch.rand(3, 5, dtype=torch.float64) + 0.1
    a[:, 1] = 0.0
    lam = ops.ctmc_lambda(a).requires_grad_()
    x_t = sample_rows(ops.reference.ctmc_transition_rows(x0, h, lam.detach(), perm, perm_inv))
    ops.score_entropy(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, backend="reference").sum().backward()
    assert torch.isfinite(lam.grad).all()

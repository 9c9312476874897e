"""CTMC ops of the Discrete Markov Bridge (docs/dmb.md §2–§4): closed forms against scipy.linalg.expm of the
explicit dense Q, gradients, the score entropy against its reference and SEDD's closed forms, expm /
expm_multi_t against scipy, and bad inputs, on every backend."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from slimrate import ops
from slimrate.ops import reference
from slimrate.ops.expm import TAYLOR_THETA

from helpers import DTYPE_IDS, assert_close_flash, rel_err, skip_unless_backend

BACKENDS = ["native", "triton", "reference"]
DTYPES = [torch.float32, torch.float64]


# ---- builders ----

def random_ctmc(L: int, V: int, dtype=torch.float64, zero_rates: float = 0.0):
    """lam, perm, perm_inv for L positions: rates a ~ U(0.05, 1.05), a fraction ``zero_rates`` of them 0 (ties in Λ)."""
    a = torch.rand(L, max(V - 1, 0), dtype=torch.float64) + 0.05
    a[torch.rand(a.shape) < zero_rates] = 0.0
    perm_inv = torch.stack([torch.randperm(V) for _ in range(L)]) if L else torch.zeros(0, V, dtype=torch.int64)
    return ops.ctmc_lambda(a).to(dtype), perm_inv.argsort(1), perm_inv


def dense_q(lam: torch.Tensor, perm: torch.Tensor, pos: int) -> np.ndarray:
    """The explicit V×V rate matrix of position pos, float64: Q[x, y] = a_{j−1} for rank j > rank i, Λ_i at j = i."""
    V = lam.shape[1]
    lam_l, rank = lam[pos].double().numpy(), perm[pos].numpy()
    q = np.zeros((V, V))
    for x in range(V):
        for y in range(V):
            i, j = rank[x], rank[y]
            q[x, y] = lam_l[j] - lam_l[j - 1] if j > i else (lam_l[i] if j == i else 0.0)
    return q


def sample_rows(p: torch.Tensor) -> torch.Tensor:
    """One state per row of p [B, L, V]."""
    B, L, V = p.shape
    return torch.multinomial(p.double().reshape(-1, V), 1).reshape(B, L)


def score_case(B: int, L: int, V: int, dtype=torch.float64, zero_rates: float = 0.0):
    lam, perm, perm_inv = random_ctmc(L, V, dtype, zero_rates)
    x0 = torch.randint(0, V, (B, L))
    h = (torch.rand(B, dtype=torch.float64) * 2 + 0.05).to(dtype)
    x_t = sample_rows(reference.ctmc_transition_rows(x0, h.double(), lam.double(), perm, perm_inv))
    sigma = (torch.rand(B, dtype=torch.float64) + 0.1).to(dtype)
    logscore = torch.randn(B, L, V, dtype=torch.float64).to(dtype)
    return logscore, x_t, x0, h, sigma, lam, perm, perm_inv


# ---- transition rows and rate columns: closed forms vs the dense Q ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 2, 6, 11])
def test_transition_rows_match_scipy_expm(backend, V):
    skip_unless_backend(backend, "cpu")
    B, L = 4, 3
    lam, perm, perm_inv = random_ctmc(L, V, zero_rates=0.2)
    x0 = torch.randint(0, V, (B, L))
    h = torch.tensor([0.0, 0.013, 1.7, 9.0], dtype=torch.float64)
    out = ops.ctmc_transition_rows(x0, h, lam, perm, perm_inv, backend=backend)
    assert out.shape == (B, L, V) and out.dtype == torch.float64
    for pos in range(L):
        q = dense_q(lam, perm, pos)
        for b in range(B):
            row = scipy.linalg.expm(h[b].item() * q)[x0[b, pos]]
            err = np.abs(out[b, pos].numpy() - row).max()
            assert err < 1e-10, f"b={b} pos={pos}: max error {err:.3g} vs scipy.linalg.expm"
    assert (out >= 0).all()
    assert (out.sum(-1) - 1).abs().max() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_cols_match_dense_q(backend):
    skip_unless_backend(backend, "cpu")
    B, L, V = 5, 3, 7
    lam, perm, perm_inv = random_ctmc(L, V, zero_rates=0.2)
    x = torch.randint(0, V, (B, L))
    out = ops.ctmc_rate_cols(x, lam, perm, perm_inv, backend=backend)
    for pos in range(L):
        q = dense_q(lam, perm, pos)
        for b in range(B):
            np.testing.assert_allclose(out[b, pos].numpy(), q[:, x[b, pos]], rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(5, 7, 27), (2, 3, 256), (1, 1, 1), (3, 2, 17), (0, 4, 5), (3, 0, 5)], ids=str)
def test_kernels_match_reference(backend, dtype, shape):
    """Rows and columns against the op chain in float64, float32 by the flash rule against the chain in float32."""
    skip_unless_backend(backend, "cpu")
    B, L, V = shape
    lam, perm, perm_inv = random_ctmc(L, V, dtype, zero_rates=0.1)
    x0 = torch.randint(0, V, (B, L))
    h = (torch.rand(B, dtype=torch.float64) * 3).to(dtype)
    rows = ops.ctmc_transition_rows(x0, h, lam, perm, perm_inv, backend=backend)
    cols = ops.ctmc_rate_cols(x0, lam, perm, perm_inv, backend=backend)
    assert rows.shape == cols.shape == (B, L, V) and rows.dtype == cols.dtype == dtype
    if B * L == 0:
        return
    ref64 = reference.ctmc_transition_rows(x0, h.double(), lam.double(), perm, perm_inv)
    assert_close_flash(rows, reference.ctmc_transition_rows(x0, h, lam, perm, perm_inv), ref64, dtype, what="rows")
    assert torch.equal(cols, reference.ctmc_rate_cols(x0, lam, perm, perm_inv))


def test_noncontiguous_inputs_and_many_threads():
    """Strided views of every argument, and more rows than one task, so several threads write."""
    skip_unless_backend("native", "cpu")
    B, L, V = 40, 300, 27
    lam, perm, perm_inv = random_ctmc(L, V, torch.float32)
    x0 = torch.randint(0, V, (L, B)).t()
    h = torch.rand(2 * B)[::2]
    lam_v, perm_v, inv_v = (t.t().contiguous().t() for t in (lam, perm, perm_inv))
    assert not x0.is_contiguous() and not h.is_contiguous() and not lam_v.is_contiguous()
    out = ops.ctmc_transition_rows(x0, h, lam_v, perm_v, inv_v)
    ref64 = reference.ctmc_transition_rows(x0, h.double(), lam.double(), perm, perm_inv)
    assert_close_flash(out, reference.ctmc_transition_rows(x0, h, lam, perm, perm_inv), ref64, torch.float32)


# ---- gradients ----

@pytest.mark.parametrize("backend", ["native", "triton"])
def test_transition_rows_gradcheck(backend):
    """Through the rates a (lam = ctmc_lambda(a), as a model parametrises it) and h."""
    skip_unless_backend(backend, "cpu")
    B, L, V = 3, 2, 5
    _, perm, perm_inv = random_ctmc(L, V)
    a = (torch.rand(L, V - 1, dtype=torch.float64) + 0.1).requires_grad_()
    h = (torch.rand(B, dtype=torch.float64) + 0.2).requires_grad_()
    x0 = torch.randint(0, V, (B, L))

    def f(a, h):
        return ops.ctmc_transition_rows(x0, h, ops.ctmc_lambda(a), perm, perm_inv, backend=backend)

    assert torch.autograd.gradcheck(f, (a, h))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gradients_match_reference(backend, dtype):
    """d/dlam (every entry, the last one too) and d/dh of the rows, d/dlam of the columns, against autograd
    through the op chain."""
    skip_unless_backend(backend, "cpu")
    B, L, V = 4, 5, 9
    lam0, perm, perm_inv = random_ctmc(L, V, dtype, zero_rates=0.2)
    x0 = torch.randint(0, V, (B, L))
    h0 = (torch.rand(B, dtype=torch.float64) * 2).to(dtype)
    g = torch.randn(B, L, V, dtype=torch.float64).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5  # fp32: a few ulps of the summed gradient
    for op in ("ctmc_transition_rows", "ctmc_rate_cols"):
        grads = []
        for fn in (lambda *a, op=op: getattr(ops, op)(*a, backend=backend), getattr(reference, op)):
            lam, h = lam0.clone().requires_grad_(), h0.clone().requires_grad_()
            out = fn(x0, h, lam, perm, perm_inv) if op == "ctmc_transition_rows" else fn(x0, lam, perm, perm_inv)
            wrt = (lam, h) if op == "ctmc_transition_rows" else (lam,)
            grads.append(torch.autograd.grad((out * g).sum(), wrt))
        for got, want in zip(*grads, strict=True):
            assert rel_err(got, want.double()) < tol, f"{op}: rel err {rel_err(got, want.double()):.3g}"


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_rate_cols_gradcheck(backend):
    skip_unless_backend(backend, "cpu")
    _, perm, perm_inv = random_ctmc(3, 6)
    a = (torch.rand(3, 5, dtype=torch.float64) + 0.1).requires_grad_()
    x = torch.randint(0, 6, (4, 3))
    assert torch.autograd.gradcheck(lambda a: ops.ctmc_rate_cols(x, ops.ctmc_lambda(a), perm, perm_inv,
                                                                backend=backend), (a,))


# ---- score entropy ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 5, 27), (2, 2, 40), (1, 1, 1), (0, 3, 4)], ids=str)
def test_score_entropy_matches_reference(backend, dtype, shape):
    """Loss and d loss / d logscore against the op chain (float64 truth; float32 by the flash rule)."""
    skip_unless_backend(backend, "cpu")
    args = score_case(*shape, dtype=dtype, zero_rates=0.15)
    logscore = args[0].clone().requires_grad_()
    loss = ops.score_entropy(logscore, *args[1:], backend=backend)
    assert loss.shape == (shape[0],) and loss.dtype == dtype
    (grad,) = torch.autograd.grad(loss.sum() if loss.numel() else logscore.sum() * 0, logscore)
    if shape[0] == 0:
        return
    args64 = [t.double() if t.is_floating_point() else t for t in args]
    ls64 = args64[0].clone().requires_grad_()
    ref64 = reference.score_entropy(ls64, *args64[1:])
    (grad64,) = torch.autograd.grad(ref64.sum(), ls64)
    ls_same = args[0].clone().requires_grad_()
    ref_same = reference.score_entropy(ls_same, *args[1:])
    (grad_same,) = torch.autograd.grad(ref_same.sum(), ls_same)
    assert_close_flash(loss, ref_same, ref64.detach(), dtype, what="loss")
    assert_close_flash(grad, grad_same, grad64, dtype, what="d loss / d logscore")


def test_score_entropy_is_zero_at_the_true_ratio_and_positive_elsewhere():
    logscore, x_t, x0, h, sigma, lam, perm, perm_inv = score_case(4, 6, 9)
    cond = reference.ctmc_transition_rows(x0, h, lam, perm, perm_inv)
    true = torch.log(cond / cond.gather(-1, x_t[..., None]))  # −inf where p(y|x0) = 0: those y must see e^s → 0
    for backend in ("native", "reference"):
        at_truth = ops.score_entropy(true.clamp_min(-700.0), x_t, x0, h, sigma, lam, perm, perm_inv, backend=backend)
        assert at_truth.abs().max() < 1e-12, backend
        assert (ops.score_entropy(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, backend=backend) > 0).all()


def sedd_absorb_entropy(score, sigma_bar, x, x0, V):
    """SEDD's Absorbing.score_entropy (louaaron/Score-Entropy-Discrete-Diffusion @ 0605786, graph_lib.py):
    per position, MASK = V − 1, score = log-score, sigma_bar = total noise [B]."""
    rel = x == V - 1
    esm1 = torch.where(sigma_bar < 0.5, torch.expm1(sigma_bar), torch.exp(sigma_bar) - 1)[:, None].expand_as(x)
    ratio = 1 / esm1[rel]
    neg = ratio * score[rel].gather(-1, x0[rel][..., None]).squeeze(-1)
    pos = score[rel][:, :-1].exp().sum(-1)
    out = torch.zeros(x.shape, dtype=score.dtype)
    out[rel] += pos - neg + ratio * (ratio.log() - 1)
    return out


def sedd_uniform_entropy(score, sigma_bar, x, x0, V):
    """SEDD's Uniform.score_entropy (same source), per position."""
    esm1 = torch.where(sigma_bar < 0.5, torch.expm1(sigma_bar), torch.exp(sigma_bar) - 1)[:, None]
    ratio = 1 - V / (esm1 + V)
    neg = score.mean(-1) - score.gather(-1, x[..., None]).squeeze(-1) / V
    neg = torch.where(x == x0, ratio * neg, score.gather(-1, x0[..., None]).squeeze(-1) / esm1 + neg)
    sexp = score.exp()
    pos = sexp.mean(-1) - sexp.gather(-1, x[..., None]).squeeze(-1) / V
    const = torch.where(x == x0, (V - 1) / V * ratio * (ratio.log() - 1), ((-ratio.log() - 1) / ratio - (V - 2)) / V)
    return pos - neg + const


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_entropy_matches_sedd_absorbing(backend):
    """SEDD-absorb is DMB's 'gather' init (docs/dmb.md §10): a = (0, …, 0, 1) puts rate 1 into the last rank (MASK)
    and 0 elsewhere; with MASK = state V−1 at the last rank, σ·(our loss) = σ·Σ_l SEDD's entropy."""
    skip_unless_backend(backend, "cpu")
    B, L, V = 6, 8, 7
    a = torch.zeros(L, V - 1, dtype=torch.float64)
    a[:, -1] = 1.0
    lam = ops.ctmc_lambda(a)
    perm_inv = torch.stack([torch.cat([torch.randperm(V - 1), torch.tensor([V - 1])]) for _ in range(L)])
    perm = perm_inv.argsort(1)
    x0 = torch.randint(0, V - 1, (B, L))  # data never holds MASK
    h = torch.tensor([0.01, 0.3, 0.49, 0.51, 2.0, 6.9], dtype=torch.float64)
    x_t = sample_rows(reference.ctmc_transition_rows(x0, h, lam, perm, perm_inv))
    assert (x_t == V - 1).any() and (x_t != V - 1).any()
    sigma = torch.rand(B, dtype=torch.float64) + 0.5
    score = torch.randn(B, L, V, dtype=torch.float64)
    ours = ops.score_entropy(score, x_t, x0, h, sigma, lam, perm, perm_inv, backend=backend)
    sedd = sigma * sedd_absorb_entropy(score, h, x_t, x0, V).sum(-1)
    torch.testing.assert_close(ours, sedd, rtol=1e-12, atol=1e-12)


def dense_score_entropy(score, x_t, x0, h, sigma, q: np.ndarray):
    """The loss straight from a dense Q [V, V] shared by every position (scipy.linalg.expm for p(·|x0))."""
    B, L, _ = score.shape
    total = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        p = scipy.linalg.expm(h[b].item() * q)
        for pos in range(L):
            xt, x_0 = int(x_t[b, pos]), int(x0[b, pos])
            for y in range(q.shape[0]):
                if y == xt or q[y, xt] == 0:
                    continue
                r, s = p[x_0, y] / p[x_0, xt], score[b, pos, y].item()
                total[b] += sigma[b] * q[y, xt] * (math.exp(s) - r * s + (r * math.log(r) if r > 0 else 0.0) - r)
    return total


def test_score_entropy_matches_dense_and_sedd_uniform():
    """SEDD-uniform, Q = (11ᵀ − V·I)/V, is not representable: DMB's Q is triangular in rank order (no rate from a
    higher rank to a lower one).  So the loss definition is checked in two links: our op equals the loss computed
    from a dense Q and scipy's expm (structured Q, one position), and that dense loss equals SEDD's uniform closed
    form for the uniform Q."""
    B, V = 5, 6
    lam, perm, perm_inv = random_ctmc(1, V, zero_rates=0.2)
    h = torch.tensor([0.05, 0.4, 0.6, 1.5, 4.0], dtype=torch.float64)
    x0 = torch.randint(0, V, (B, 1))
    x_t = sample_rows(reference.ctmc_transition_rows(x0, h, lam, perm, perm_inv))
    sigma = torch.rand(B, dtype=torch.float64) + 0.5
    score = torch.randn(B, 1, V, dtype=torch.float64)
    ours = ops.score_entropy(score, x_t, x0, h, sigma, lam, perm, perm_inv)
    torch.testing.assert_close(ours, dense_score_entropy(score, x_t, x0, h, sigma, dense_q(lam, perm, 0)),
                               rtol=1e-11, atol=1e-12)

    L = 4
    q_uniform = (np.ones((V, V)) - V * np.eye(V)) / V
    x0 = torch.randint(0, V, (B, L))
    x_t = torch.where(torch.rand(B, L) < 0.5, x0, torch.randint(0, V, (B, L)))
    score = torch.randn(B, L, V, dtype=torch.float64)
    sedd = sigma * sedd_uniform_entropy(score, h, x_t, x0, V).sum(-1)
    torch.testing.assert_close(dense_score_entropy(score, x_t, x0, h, sigma, q_uniform), sedd, rtol=1e-11, atol=1e-12)


def test_score_entropy_no_grad_and_backward_paths():
    """Under no_grad the kernel skips the gradient; the op's direct call without it refuses a backward."""
    skip_unless_backend("native", "cpu")
    args = score_case(2, 3, 5)
    with torch.no_grad():
        loss, g = torch.ops.slimrate.score_entropy(*args, False)
    assert g.numel() == 0
    torch.testing.assert_close(loss, reference.score_entropy(*args))
    ls = args[0].clone().requires_grad_()
    loss, _ = torch.ops.slimrate.score_entropy(ls, *args[1:], False)
    with pytest.raises(RuntimeError, match="with_grad=False"):
        loss.sum().backward()


# ---- registration: opcheck and torch.compile ----

def test_opcheck_native_ops():
    skip_unless_backend("native", "cpu")
    logscore, x_t, x0, h, sigma, lam, perm, perm_inv = score_case(3, 4, 6)
    lam_g = lam.clone().requires_grad_()
    cases = [
        (torch.ops.slimrate.ctmc_transition_rows.default, (x0, h.clone().requires_grad_(), lam_g, perm, perm_inv)),
        (torch.ops.slimrate.ctmc_transition_rows_backward.default, (torch.randn(3, 4, 6, dtype=torch.float64), x0, h,
                                                                    lam, perm, perm_inv)),
        (torch.ops.slimrate.ctmc_rate_cols.default, (x_t, lam_g, perm, perm_inv)),
        (torch.ops.slimrate.score_entropy.default, (logscore.clone().requires_grad_(), x_t, x0, h, sigma, lam, perm,
                                                    perm_inv, True)),
        (torch.ops.slimrate.score_entropy.default, (logscore, x_t, x0, h, sigma, lam, perm, perm_inv, False)),
        (torch.ops.slimrate.score_entropy.default, (logscore, x_t, x0, h.clone().requires_grad_(),
                                                    sigma.clone().requires_grad_(), lam_g, perm, perm_inv, False)),
        (torch.ops.slimrate.score_entropy_rate_backward.default, (torch.rand(3, dtype=torch.float64), logscore, x_t,
                                                                  x0, h, sigma, lam, perm, perm_inv)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("q_in_score", [False, True], ids=["q-frozen-in-score", "q-through-score"])
def test_compiled_training_step_matches_eager(q_in_score):
    skip_unless_backend("native", "cpu")
    logscore, x_t, x0, h, sigma, lam, perm, perm_inv = score_case(2, 3, 5, torch.float32)

    def step(ls, lam):
        rows = ops.ctmc_transition_rows(x0, h, lam, perm, perm_inv)
        lam_s = lam if q_in_score else lam.detach()
        return ops.score_entropy(ls, x_t, x0, h, sigma, lam_s, perm, perm_inv).sum() + rows.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        ls, lam_g = logscore.clone().requires_grad_(), lam.clone().requires_grad_()
        out = fn(ls, lam_g)
        results.append((out, *torch.autograd.grad(out, (ls, lam_g))))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


# ---- expm and expm_multi_t against scipy ----

def random_rate_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    q = torch.rand(n, n, dtype=torch.float64) * 2 / n
    q.fill_diagonal_(0)
    q -= torch.diag(q.sum(1))
    return q.to(dtype)


def scipy_rel_err(got: torch.Tensor, q: np.ndarray) -> float:
    want = scipy.linalg.expm(q)
    return float(np.abs(got.double().numpy() - want).sum(0).max() / max(np.abs(want).sum(0).max(), 1e-300))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_expm_matches_scipy(backend):
    """1-norms from 0 to 300 (Padé degrees 3..13 with up to 6 squarings), batched with leading dims."""
    scales = torch.tensor([0.0, 1e-3, 0.1, 0.9, 2.0, 5.0, 40.0, 300.0], dtype=torch.float64)
    q = torch.randn(8, 7, 7, dtype=torch.float64)
    q = q / q.abs().sum(-2).amax(-1)[:, None, None] * scales[:, None, None]
    q = q.reshape(2, 4, 7, 7)
    out = ops.expm(q, backend=backend)
    assert out.shape == q.shape
    for i in range(8):
        mat = q.reshape(8, 7, 7)[i]
        err = scipy_rel_err(out.reshape(8, 7, 7)[i], mat.numpy())
        assert err < 1e-13 * max(1.0, scales[i].item()), f"‖Q‖₁ = {scales[i]}: rel err {err:.3g}"
    out32 = ops.expm(q.float(), backend=backend)
    for i in range(8):
        assert scipy_rel_err(out32.reshape(8, 7, 7)[i], q.reshape(8, 7, 7)[i].numpy()) < 2e-5 * max(1, scales[i])


@pytest.mark.parametrize("kind", ["rate", "general"])
def test_expm_multi_t_matches_scipy(kind):
    """Stated accuracy (ops/expm.py): backward error ≲ u·α|t|; measured here in float64 as 1-norm relative error
    ≤ 1e-12·max(1, ‖tQ‖₁) for a rate matrix and a non-normal Gaussian one, times of both signs, 0, and up to
    ‖tQ‖₁ ≈ 100 (several chain steps)."""
    n = 24
    q = random_rate_matrix(n) if kind == "rate" else torch.randn(n, n, dtype=torch.float64) / math.sqrt(n)
    norm = q.abs().sum(0).max().item()
    ts = torch.cat([torch.tensor([0.0, 1e-4, -0.3, -2.0]), torch.logspace(-3, 2, 16) / norm]).double()
    if kind == "general":
        ts = ts.clamp(max=15 / norm)  # keep ‖exp(tQ)‖ moderate for a matrix without a generator's bound
    out = ops.expm_multi_t(q, ts)
    assert out.shape == (len(ts), n, n)
    for i, t in enumerate(ts.tolist()):
        err = scipy_rel_err(out[i], t * q.numpy())
        assert err < 1e-12 * max(1.0, abs(t) * norm), f"t = {t:.3g} (‖tQ‖₁ = {abs(t) * norm:.3g}): rel err {err:.3g}"
    out32 = ops.expm_multi_t(q.float(), ts)
    for i, t in enumerate(ts.tolist()):
        assert scipy_rel_err(out32[i], t * q.numpy()) < 1e-5 * max(1.0, abs(t) * norm)


def test_expm_multi_t_reference_backend_and_gradient():
    q = random_rate_matrix(6)
    ts = torch.tensor([0.5, 0.1, 3.0], dtype=torch.float64)
    torch.testing.assert_close(ops.expm_multi_t(q, ts), ops.expm_multi_t(q, ts, backend="reference"))
    qg = q.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda m: ops.expm_multi_t(m, ts), (qg,))
    assert torch.autograd.gradcheck(lambda m: ops.expm(m), (qg,))


def test_taylor_thetas_rederived():
    """Two entries of TAYLOR_THETA from their definition: the largest θ with Σ_{k>m} |c_k| θ^{k−1} ≤ u, c_k the
    Taylor coefficients of log(e^{−x}·T_m(x))."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    for m, dtype, u in ((20, torch.float64, mp.mpf(2) ** -53), (30, torch.float32, mp.mpf(2) ** -24)):
        K = m + 150
        t = [mp.mpf(1) / mp.factorial(k) if k <= m else mp.mpf(0) for k in range(K + 1)]
        c = [mp.mpf(0)] * (K + 1)  # log T_m by T·(log T)' = T'
        for k in range(1, K + 1):
            c[k] = (k * t[k] - sum(j * c[j] * t[k - j] for j in range(1, k))) / k
        tail = [abs(c[k]) for k in range(m + 1, K + 1)]
        bound = mp.findroot(lambda th, tail=tail, m=m, u=u: sum(ck * th ** (m + i) for i, ck in enumerate(tail)) - u,
                            TAYLOR_THETA[dtype][m])
        assert abs(float(bound) / TAYLOR_THETA[dtype][m] - 1) < 1e-4


# ---- bad inputs ----

def bad_call(case: str):
    """(op, valid arguments, the change that breaks them, exception, argument named in the message)."""
    logscore, x_t, x0, h, sigma, lam, perm, perm_inv = score_case(2, 3, 5)
    big, neg = x0.clone(), x0.clone()
    big[1, 2], neg[0, 0] = 5, -1
    lam_neg_rate, lam_last, lam_nan = lam.clone(), lam.clone(), lam.clone()
    lam_neg_rate[1, 1] = lam[1, 2] + 0.5
    lam_last[0, -1] = 0.1
    lam_nan[2, 0] = float("nan")
    swapped, out_of_range = perm_inv.clone(), perm_inv.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    out_of_range[2, 3] = 7
    rows = (ops.ctmc_transition_rows, dict(x0=x0, h=h, lam=lam, perm=perm, perm_inv=perm_inv))
    cols = (ops.ctmc_rate_cols, dict(x=x_t, lam=lam, perm=perm, perm_inv=perm_inv))
    score = (ops.score_entropy, dict(logscore=logscore, x_t=x_t, x0=x0, h=h, sigma=sigma, lam=lam, perm=perm,
                                     perm_inv=perm_inv))
    cases = {
        "rows-token-too-big": (*rows, dict(x0=big), ValueError, "x0"),
        "rows-token-negative": (*rows, dict(x0=neg), ValueError, "x0"),
        "rows-negative-rate": (*rows, dict(lam=lam_neg_rate), ValueError, "lam"),
        "rows-last-lambda-nonzero": (*rows, dict(lam=lam_last), ValueError, "lam"),
        "rows-lambda-nan": (*rows, dict(lam=lam_nan), ValueError, "lam"),
        "rows-negative-h": (*rows, dict(h=-h), ValueError, "h"),
        "rows-perm-not-inverse": (*rows, dict(perm_inv=swapped), ValueError, "perm"),
        "rows-perm-inv-out-of-range": (*rows, dict(perm_inv=out_of_range), ValueError, "perm_inv"),
        "rows-x0-wrong-L": (*rows, dict(x0=x0[:, :2]), ValueError, "x0"),
        "rows-h-wrong-B": (*rows, dict(h=h[:1]), ValueError, "h"),
        "rows-perm-wrong-shape": (*rows, dict(perm=perm[:, :4]), ValueError, "perm"),
        "rows-x0-int32": (*rows, dict(x0=x0.int()), TypeError, "x0"),
        "rows-h-dtype": (*rows, dict(h=h.float()), TypeError, "h"),
        "rows-lam-fp16": (*rows, dict(lam=lam.half()), TypeError, "lam"),
        "cols-token-too-big": (*cols, dict(x=big), ValueError, "x"),
        "cols-negative-rate": (*cols, dict(lam=lam_neg_rate), ValueError, "lam"),
        "score-x_t-too-big": (*score, dict(x_t=big), ValueError, "x_t"),
        "score-x0-negative": (*score, dict(x0=neg), ValueError, "x0"),
        "score-negative-sigma": (*score, dict(sigma=-sigma), ValueError, "sigma"),
        "score-negative-h": (*score, dict(h=-h), ValueError, "h"),
        "score-logscore-wrong-V": (*score, dict(logscore=logscore[:, :, :4]), ValueError, "logscore"),
        "score-logscore-dtype": (*score, dict(logscore=logscore.float()), TypeError, "logscore"),
        "score-negative-rate": (*score, dict(lam=lam_neg_rate), ValueError, "lam"),
    }
    return cases[case]


BAD_CASES = ["rows-token-too-big", "rows-token-negative", "rows-negative-rate", "rows-last-lambda-nonzero",
             "rows-lambda-nan", "rows-negative-h", "rows-perm-not-inverse", "rows-perm-inv-out-of-range",
             "rows-x0-wrong-L", "rows-h-wrong-B", "rows-perm-wrong-shape", "rows-x0-int32", "rows-h-dtype",
             "rows-lam-fp16", "cols-token-too-big", "cols-negative-rate", "score-x_t-too-big", "score-x0-negative",
             "score-negative-sigma", "score-negative-h", "score-logscore-wrong-V", "score-logscore-dtype",
             "score-negative-rate"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_raise_naming_the_argument(backend, case):
    skip_unless_backend(backend, "cpu")
    fn, args, change, exc, name = bad_call(case)
    with pytest.raises(exc, match=rf"^{name}:"):
        fn(**{**args, **change}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_x_t_raises(backend):
    """x_t below x0 in rank, or h = 0 with x_t ≠ x0: p(x_t | x0) = 0 and the ratio is undefined."""
    skip_unless_backend(backend, "cpu")
    logscore, x_t, x0, h, sigma, lam, perm, perm_inv = score_case(2, 3, 5)
    x0[0, 1], x_t[0, 1] = perm_inv[1, 3], perm_inv[1, 2]  # rank(x_t) = 2 < rank(x0) = 3
    with pytest.raises(ValueError, match="^x_t:"):
        ops.score_entropy(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, backend=backend)
    x0[0, 1], x_t[0, 1] = perm_inv[1, 1], perm_inv[1, 3]
    h[0] = 0.0
    with pytest.raises(ValueError, match="^x_t:"):
        ops.score_entropy(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, backend=backend)


def test_direct_native_calls_check_their_data():
    """torch.ops.slimrate.* without the Python face: the glue's checks, never an out-of-bounds read."""
    skip_unless_backend("native", "cpu")
    logscore, x_t, x0, h, sigma, lam, perm, perm_inv = score_case(2, 3, 5)
    x0[0, 0] = 99
    with pytest.raises(ValueError, match="x0"):
        torch.ops.slimrate.ctmc_transition_rows(x0, h, lam, perm, perm_inv)
    with pytest.raises(ValueError, match="perm_inv"):
        torch.ops.slimrate.ctmc_rate_cols(x_t, lam, perm, perm_inv + 5)
    with pytest.raises(ValueError, match="grad"):
        torch.ops.slimrate.ctmc_transition_rows_backward(logscore[:, :2], x_t, h, lam, perm, perm_inv)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("op", ["expm", "expm_multi_t"])
def test_expm_refuses_non_finite_q_on_every_backend(op, backend):
    q = torch.randn(3, 3, dtype=torch.float64)
    q[1, 2] = float("nan")
    call = {"expm": lambda: ops.expm(q, backend=backend),
            "expm_multi_t": lambda: ops.expm_multi_t(q, [0.5, 1.0], backend=backend)}[op]
    with pytest.raises(ValueError, match="^Q: expected finite entries"):
        call()


def test_expm_bad_inputs():
    with pytest.raises(ValueError, match="Q"):
        ops.expm(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="Q"):
        ops.expm(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="Q"):
        ops.expm_multi_t(torch.zeros(2, 3, 3), [1.0])
    with pytest.raises(ValueError, match="ts"):
        ops.expm_multi_t(torch.zeros(3, 3), [1.0, float("inf")])
    with pytest.raises(ValueError, match="backend"):
        ops.expm(torch.zeros(3, 3), backend="triton")
    with pytest.raises(ValueError, match="a"):
        ops.ctmc_lambda(-torch.ones(2, 3))

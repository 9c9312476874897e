"""The CTMC ops of the Discrete Markov Bridge (docs/dmb.md §2–§4): rows of exp(h·Q) and columns of Q for DMB's
structured rate matrix, and the fused denoising score entropy, without ever forming a V×V matrix.

Conventions (docs/dmb.md §2, as in DMB's code): row vectors, Q[x, y] is the rate x → y; per position l,
``perm[l, y]`` is the rank of state y and ``perm_inv[l, j]`` the state at rank j (inverse permutations);
``lam[l]`` is Λ in rank order, Λ_j = −Σ_{i≥j} a_i with rates a_i ≥ 0 (non-decreasing, last entry 0, the code's
get_lambda).  Rank i moves to rank j > i at rate a_{j−1}; the last rank absorbs.  h = σ̄(t) is the total noise,
sigma = σ(t) the noise rate.

Closed forms (docs/dmb.md §4, derived from Q = A·U·diag(Λ)·U⁻¹·A⁻¹, Lemma 4.3 / Prop. 5.1 of the DMB paper), with
k0 = rank(x0), j = rank(y), E_j = exp(hΛ_j):  p(y|x0) = 0 (j < k0), E_{k0} (j = k0), E_j − E_{j−1} (j > k0);
Q[y, x] with k = rank(x): a_{k−1} (j < k), Λ_k (j = k), 0 (j > k).

Input checks: shapes, dtypes and devices here; token ranges, perm/perm_inv consistency, lam validity, h ≥ 0
and sigma ≥ 0 in the compiled glue for the native backend (csrc/ctmc_inputs.h: one pass, no graph break under
torch.compile) and in ``check_*_data`` below before the Triton and reference backends (the registry's
DATA_CHECKS, ops/backend.py).  All raise ValueError or TypeError naming the argument.
"""

from __future__ import annotations

import torch

from slimrate.ops import reference
from slimrate.ops.backend import extension_available, pick_backend
from slimrate.ops.checks import check_tensor

CTMC_DTYPES = (torch.float32, torch.float64)


# ---- argument checks ----

def _check_structure(lam, perm, perm_inv) -> tuple[int, int]:
    check_tensor("lam", lam, dtypes=CTMC_DTYPES)
    if lam.dim() != 2 or lam.shape[1] == 0:
        raise ValueError(f"lam: expected a [L, V] tensor with V > 0, got shape {tuple(lam.shape)}")
    for name, t in (("perm", perm), ("perm_inv", perm_inv)):
        _check_index(name, t, lam)
        if t.shape != lam.shape:
            raise ValueError(f"{name}: expected shape {tuple(lam.shape)} like lam, got {tuple(t.shape)}")
    return lam.shape[0], lam.shape[1]


def _check_index(name: str, t, lam: torch.Tensor) -> None:
    check_tensor(name, t, dtypes=(torch.int64,), device=lam.device)


def _check_tokens(name: str, x, lam: torch.Tensor, batch: int | None = None) -> int:
    _check_index(name, x, lam)
    L = lam.shape[0]
    if x.dim() != 2 or x.shape[1] != L or (batch is not None and x.shape[0] != batch):
        want = f"[{'B' if batch is None else batch}, L = {L}]"
        raise ValueError(f"{name}: expected token ids of shape {want}, got {tuple(x.shape)}")
    return x.shape[0]


def _as_times(name: str, t, batch: int, lam: torch.Tensor) -> torch.Tensor:
    """t as a [batch] tensor in lam's dtype: a Python number is broadcast, a tensor must match exactly."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.full((batch,), float(t), dtype=lam.dtype, device=lam.device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a [B] tensor or a Python number, got {type(t).__name__}")
    if t.dtype != lam.dtype:
        raise TypeError(f"{name}: expected {lam.dtype} like lam, got {t.dtype}")
    if t.shape != (batch,) or t.device != lam.device:
        raise ValueError(f"{name}: expected shape ({batch},) on {lam.device}, got {tuple(t.shape)} on {t.device}")
    return t


def _check_data(lam, perm, perm_inv, tokens: dict, times: dict) -> None:
    """The glue's data checks (csrc/ctmc_inputs.h) for the backends without it: one synchronisation."""
    L, V = lam.shape
    checks: list[tuple[torch.Tensor, str]] = []
    for name, x in tokens.items():
        if x.numel():
            checks.append((((x < 0) | (x >= V)).any(), f"{name}: a token id is not in [0, V = {V})"))
    if L:
        checks.append((((perm_inv < 0) | (perm_inv >= V)).any(), "perm_inv: an entry is not a state in [0, V)"))
        ranks = torch.arange(V, device=lam.device).expand(L, V)
        checks.append((perm.gather(1, perm_inv.clamp(0, V - 1)).ne(ranks).any(),
                       "perm: perm[l, perm_inv[l, k]] != k somewhere; perm[l] and perm_inv[l] must be inverse "
                       "permutations"))
        checks.append((~torch.isfinite(lam).all(), "lam: an entry is not finite"))
        checks.append(((lam[:, 1:] < lam[:, :-1]).any(),
                       "lam: a row decreases (a negative rate a_i = lam[l, i+1] - lam[l, i]); build lam as "
                       "Λ_k = −Σ_{i≥k} a_i from rates a_i ≥ 0"))
        checks.append(((lam[:, -1] != 0).any(), "lam: expected lam[:, V-1] = 0 (the absorbing last rank)"))
    for name, t in times.items():
        if t.numel():
            checks.append((((~torch.isfinite(t)) | (t < 0)).any(), f"{name}: expected finite values >= 0"))
    if not checks:
        return
    flags = torch.stack([c for c, _ in checks]).tolist()
    for bad, (_, message) in zip(flags, checks, strict=True):
        if bad:
            raise ValueError(message)


def _check_reachable(x_t, x0, h, sigma, lam, perm) -> None:
    """score_entropy's extra data check: p(x_t | x0) > 0 wherever the weight is nonzero."""
    B, L = x_t.shape
    if B * L == 0:
        return
    k = perm.gather(1, x_t.t()).t()
    k0 = perm.gather(1, x0.t()).t()
    rate = lam.gather(1, k.t()).t() - lam.gather(1, (k - 1).clamp_min(0).t()).t()
    weighted = (k > 0) & (sigma[:, None] * rate > 0)
    bad = weighted & ((k < k0) | ((k > k0) & (h[:, None] * rate == 0)))
    if bad.any():
        b, pos = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"x_t: x_t[{b}, {pos}] = {int(x_t[b, pos])} cannot be reached from x0 = {int(x0[b, pos])} in "
                         f"time "
                         f"h = {float(h[b])}: p(x_t | x0) = 0, so the score ratio is undefined; sample x_t from "
                         "ctmc_transition_rows(x0, h, ...)")


def check_rows_data(x0, h, lam, perm, perm_inv) -> None:
    """ctmc_transition_rows' data checks off the native backend."""
    _check_data(lam, perm, perm_inv, {"x0": x0}, {"h": h})


def check_cols_data(x, lam, perm, perm_inv) -> None:
    """ctmc_rate_cols' data checks off the native backend."""
    _check_data(lam, perm, perm_inv, {"x": x}, {})


def check_score_data(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad) -> None:
    """score_entropy's data checks off the native backend."""
    _check_data(lam, perm, perm_inv, {"x_t": x_t, "x0": x0}, {"h": h, "sigma": sigma})
    _check_reachable(x_t, x0, h, sigma, lam, perm)


# ---- the ops ----

def ctmc_lambda(a: torch.Tensor) -> torch.Tensor:
    """Λ from the rates: a [L, V−1] (≥ 0, any float dtype) -> lam [L, V] with Λ_k = −Σ_{i≥k} a_i, Λ_{V−1} = 0
    (DMB's get_lambda without its relu: concat 0 → negate → reverse cumsum).  Differentiable in a.

    A parallel scan (CUDA's cumsum) may add in an order where rounding makes one partial sum smaller than the
    previous; the running maximum restores the non-decreasing order every op checks (a no-op in exact arithmetic).
    """
    if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dim() != 2:
        raise TypeError(f"a: expected a float [L, V-1] tensor of rates, got {a!r:.80}")
    if (a.detach() < 0).any():
        raise ValueError("a: rates must be >= 0 (DMB applies relu to its parameters first)")
    lam = -torch.cat([a, a.new_zeros(a.shape[0], 1)], 1).flip(1).cumsum(1).flip(1)
    return torch.cummax(lam, dim=1).values


def ctmc_transition_rows(x0: torch.Tensor, h: torch.Tensor | float, lam: torch.Tensor, perm: torch.Tensor,
                         perm_inv: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """p(· | x0) after time h: rows x0 of exp(h·Q) for DMB's structured Q, [B, L, V] in lam's dtype.

    x0 [B, L] int64 token ids; h [B] (σ̄(t), ≥ 0, lam's dtype) or a number; lam [L, V] float32/float64;
    perm, perm_inv [L, V] int64.  O(B·L·V), no V×V matrix.  Differentiable in lam and h (closed-form backward,
    summation by parts: ∂/∂Λ_j = h·E_j·(G'_j − G'_{j+1}) over ranks j ≥ rank(x0)).
    """
    _check_structure(lam, perm, perm_inv)
    B = _check_tokens("x0", x0, lam)
    h = _as_times("h", h, B, lam)
    return pick_backend("ctmc_transition_rows", backend, lam.device)(x0, h, lam, perm, perm_inv)


def ctmc_rate_cols(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, perm_inv: torch.Tensor, *,
                   backend: str | None = None) -> torch.Tensor:
    """Column x of Q, the rates into each x: out[b, l, y] = Q[y, x[b, l]], [B, L, V] in lam's dtype.

    x [B, L] int64; lam, perm, perm_inv as in ctmc_transition_rows.  The diagonal entry (y = x) is Λ_{rank(x)} ≤ 0.
    Differentiable in lam.
    """
    _check_structure(lam, perm, perm_inv)
    _check_tokens("x", x, lam)
    return pick_backend("ctmc_rate_cols", backend, lam.device)(x, lam, perm, perm_inv)


def score_entropy(logscore: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, h: torch.Tensor | float,
                  sigma: torch.Tensor | float, lam: torch.Tensor, perm: torch.Tensor, perm_inv: torch.Tensor, *,
                  backend: str | None = None) -> torch.Tensor:
    """Diffusion-weighted denoising score entropy per sequence, [B] in lam's dtype (nats; docs/dmb.md §4, SEDD eq. 10):

        Σ_l Σ_{y ≠ x_t} σ·Q[y, x_t]·(e^{s_y} − r_y·s_y + r_y(log r_y − 1)),   r_y = p(y|x0) / p(x_t|x0)

    with s = logscore [B, L, V] (lam's dtype), x_t, x0 [B, L] int64, h = σ̄(t) and sigma = σ(t) [B] (≥ 0, or
    numbers).  The constant is included: every term is ≥ 0 and 0 at s_y = log r_y.  logscore[..., x_t] does not
    enter the loss (DMB's score scatter).  r is formed in log space, so it stays finite where p(·|x0) underflows.
    Differentiable in logscore, lam, h and sigma on every backend.  The native and Triton backends produce
    d loss / d logscore in the same pass as the loss; the gradients in lam [L, V], h and sigma [B] (lam's dtype)
    are computed in backward only when one of them requires grad (score_entropy_rate_grads: through the rows' and
    columns' own backward, docs/dmb.md §4), so a step with Q frozen costs what it did.  A y with
    p(y|x0) = 0 (ranked below x0, or behind a zero rate) adds nothing to the gradient in lam and h.  x_t must be
    reachable from x0 wherever the weight is nonzero (ValueError otherwise).
    """
    _check_structure(lam, perm, perm_inv)
    B = _check_tokens("x_t", x_t, lam)
    _check_tokens("x0", x0, lam, batch=B)
    check_tensor("logscore", logscore, dtypes=(lam.dtype,), device=lam.device, shape=(B, *lam.shape))
    h = _as_times("h", h, B, lam)
    sigma = _as_times("sigma", sigma, B, lam)
    with_grad = torch.is_grad_enabled() and logscore.requires_grad
    op = pick_backend("score_entropy", backend, lam.device)
    return op(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad)[0]


def reference_score_entropy(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad) -> tuple:
    """score_entropy's reference backend in the op's schema: (loss [B], an empty tensor), as autograd
    differentiates the reference itself (in logscore, lam, h and sigma)."""
    return reference.score_entropy(logscore, x_t, x0, h, sigma, lam, perm, perm_inv), logscore.new_empty((0,))


# ---- autograd of the Triton kernels (and of the native ctmc_rate_cols) ----

def _rows_setup(ctx, inputs, output) -> None:
    x0, h, lam, perm, perm_inv = inputs
    ctx.save_for_backward(x0, h, lam, perm, perm_inv)  # the output is recomputed, not saved


def _rows_backward(ctx, grad: torch.Tensor, backward_kernel) -> tuple:
    x0, h, lam, perm, perm_inv = ctx.saved_tensors
    dlam, dh = backward_kernel(grad.contiguous(), x0, h, lam, perm, perm_inv)
    need = ctx.needs_input_grad
    return None, dh if need[1] else None, dlam if need[2] else None, None, None


def _cols_setup(ctx, inputs, output) -> None:
    x, lam, perm, perm_inv = inputs
    ctx.save_for_backward(x, perm, perm_inv)


def _cols_dlam(grad: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, perm_inv: torch.Tensor) -> torch.Tensor:
    """ctmc_rate_cols' backward, d/dlam [L, V] for the output gradient grad [B, L, V]: out[y] = a_{k−1} (rank
    j < k), Λ_k (j = k), so ∂/∂Λ_k = Σ_{j≤k} G'_j, ∂/∂Λ_{k−1} = −Σ_{j<k} G'_j (k ≥ 1)."""
    B, L, V = grad.shape
    g_rank = grad.gather(-1, perm_inv.expand(B, L, V))  # G' in rank order
    k = perm.gather(1, x.t()).t()  # [B, L]
    below = (torch.arange(V, device=x.device) < k[..., None]).to(grad.dtype)
    s_lt = (g_rank * below).sum(-1)
    g_k = g_rank.gather(-1, k[..., None]).squeeze(-1)
    row = torch.arange(L, device=x.device) * V
    dlam = grad.new_zeros(L * V)
    dlam.index_add_(0, (row + k).flatten(), (s_lt + g_k).flatten())
    dlam.index_add_(0, (row + (k - 1).clamp_min(0)).flatten(), torch.where(k > 0, -s_lt, 0.0).flatten())
    return dlam.view(L, V)


def _cols_backward(ctx, grad: torch.Tensor) -> tuple:
    x, perm, perm_inv = ctx.saved_tensors
    return None, _cols_dlam(grad, x, perm, perm_inv), None, None


def score_entropy_rate_grads(grad_loss, logscore, x_t, x0, h, sigma, lam, perm, perm_inv, rows, rows_backward,
                             cols) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """score_entropy's gradients in (lam [L, V], h [B], sigma [B]) for the loss gradient grad_loss [B].

    The loss depends on lam and h through its rows p(·|x0) and columns Q[·, x_t] only, so their gradients go
    through those families' own backward (``rows_backward``, ``_cols_dlam``); ``rows``, ``rows_backward`` and
    ``cols`` are one backend's kernels.  With w_y = σ·Q[y, x_t], term_y = e^s − r s + r(log r − 1) (y ≠ x_t):
    ∂/∂Q[y, x_t] = σ·term_y;  ∂/∂p(y|x0) = w_y(log r_y − s_y)/p(x_t|x0);  ∂/∂p(x_t|x0) = −Σ_y w_y(log r_y − s_y)
    r_y/p(x_t|x0);  ∂/∂σ = Σ_y Q[y, x_t]·term_y.  A y with p(y|x0) = 0 (ranked below x0: 0 for every lam and h)
    adds nothing to the gradient in p, so it stays finite; so does a row with p(x_t|x0) = 0 (weight 0).
    """
    cond = rows(x0, h, lam, perm, perm_inv)
    col = cols(x_t, lam, perm, perm_inv)
    off = torch.ones_like(col, dtype=torch.bool).scatter(-1, x_t[..., None], False)  # y ≠ x_t
    p_t = cond.gather(-1, x_t[..., None])
    live = off & (cond > 0) & (p_t > 0)
    p_safe = torch.where(p_t > 0, p_t, 1.0)
    ratio = torch.where(live, cond / p_safe, 1.0)  # 1 where masked: no log(0) or 0/0
    log_ratio = ratio.log()
    term = torch.where(off & (p_t > 0), logscore.exp() + torch.where(live, ratio * (log_ratio - 1 - logscore), 0.0),
                       0.0)
    scale = (grad_loss * sigma)[:, None, None]
    g_cond = torch.where(live, scale * col * (log_ratio - logscore) / p_safe, 0.0)
    g_cond = g_cond.scatter(-1, x_t[..., None], -(g_cond * ratio).sum(-1, keepdim=True))
    dlam, dh = rows_backward(g_cond.contiguous(), x0, h, lam, perm, perm_inv)
    dlam = dlam + _cols_dlam(scale * term, x_t, perm, perm_inv)
    return dlam, dh, grad_loss * (torch.where(off, col, 0.0) * term).sum((1, 2))


def _score_setup(ctx, inputs, output) -> None:
    need = ctx.needs_input_grad
    rates = need[3] or need[4] or need[5]  # h, sigma, lam: the score-learning step (logscore only) saves no input
    ctx.save_for_backward(output[1], *(inputs[:8] if rates else ()))  # output[1]: d loss[b] / d logscore
    ctx.with_grad = inputs[-1]
    ctx.mark_non_differentiable(output[1])


def _score_backward(ctx, grad_loss: torch.Tensor, _grad_of_grad) -> tuple:
    need = ctx.needs_input_grad
    g, *inputs = ctx.saved_tensors
    dlogscore = dlam = dh = dsigma = None
    if need[0]:
        if not ctx.with_grad:
            raise RuntimeError("score_entropy: the op ran with with_grad=False, so it kept no gradient; call "
                               "slimrate.ops.score_entropy, which sets it when logscore requires grad")
        dlogscore = grad_loss[:, None, None] * g
    if inputs:
        from slimrate.triton_kernels import (
            ctmc_rate_cols_triton,
            ctmc_transition_rows_backward_triton,
            ctmc_transition_rows_triton,
        )

        dlam, dh, dsigma = score_entropy_rate_grads(grad_loss, *inputs, ctmc_transition_rows_triton,
                                                    ctmc_transition_rows_backward_triton, ctmc_rate_cols_triton)
    return (dlogscore, None, None, dh if need[3] else None, dsigma if need[4] else None,
            dlam if need[5] else None, None, None, None)


class TritonTransitionRows(torch.autograd.Function):
    """ctmc_transition_rows' Triton backend, differentiable in h and lam."""

    @staticmethod
    def forward(x0, h, lam, perm, perm_inv):
        from slimrate.triton_kernels import ctmc_transition_rows_triton

        return ctmc_transition_rows_triton(x0, h, lam, perm, perm_inv)

    setup_context = staticmethod(_rows_setup)

    @staticmethod
    def backward(ctx, grad):
        from slimrate.triton_kernels import ctmc_transition_rows_backward_triton

        return _rows_backward(ctx, grad, ctmc_transition_rows_backward_triton)


class TritonRateCols(torch.autograd.Function):
    """ctmc_rate_cols' Triton backend, differentiable in lam."""

    @staticmethod
    def forward(x, lam, perm, perm_inv):
        from slimrate.triton_kernels import ctmc_rate_cols_triton

        return ctmc_rate_cols_triton(x, lam, perm, perm_inv)

    setup_context = staticmethod(_cols_setup)
    backward = staticmethod(_cols_backward)


class TritonScoreEntropy(torch.autograd.Function):
    """score_entropy's Triton backend: (loss, d loss / d logscore) from one pass; lam, h and sigma through
    score_entropy_rate_grads with the Triton row and column kernels."""

    @staticmethod
    def forward(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad):
        from slimrate.triton_kernels import score_entropy_triton

        return score_entropy_triton(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad)

    setup_context = staticmethod(_score_setup)
    backward = staticmethod(_score_backward)


if extension_available():
    @torch.library.register_fake("slimrate::ctmc_transition_rows")
    def _ctmc_transition_rows_fake(x0, h, lam, perm, perm_inv):
        return lam.new_empty((x0.shape[0], lam.shape[0], lam.shape[1]))

    @torch.library.register_fake("slimrate::ctmc_transition_rows_backward")
    def _ctmc_transition_rows_backward_fake(grad, x0, h, lam, perm, perm_inv):
        return lam.new_empty(lam.shape), lam.new_empty((x0.shape[0],))

    @torch.library.register_fake("slimrate::ctmc_rate_cols")
    def _ctmc_rate_cols_fake(x, lam, perm, perm_inv):
        return lam.new_empty((x.shape[0], lam.shape[0], lam.shape[1]))

    @torch.library.register_fake("slimrate::score_entropy")
    def _score_entropy_fake(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad):
        grad = lam.new_empty(logscore.shape) if with_grad else lam.new_empty((0,))
        return lam.new_empty((x_t.shape[0],)), grad

    @torch.library.custom_op("slimrate::score_entropy_rate_backward", mutates_args=())
    def score_entropy_rate_backward(grad_loss: torch.Tensor, logscore: torch.Tensor, x_t: torch.Tensor,
                                    x0: torch.Tensor, h: torch.Tensor, sigma: torch.Tensor, lam: torch.Tensor,
                                    perm: torch.Tensor, perm_inv: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The native score_entropy's backward in (lam, h, sigma): score_entropy_rate_grads with the native
        kernels, on any device that has them (called by csrc/cpu/ctmc_autograd.cpp)."""
        ns = torch.ops.slimrate
        return score_entropy_rate_grads(grad_loss, logscore, x_t, x0, h, sigma, lam, perm, perm_inv,
                                        ns.ctmc_transition_rows, ns.ctmc_transition_rows_backward, ns.ctmc_rate_cols)

    @score_entropy_rate_backward.register_fake
    def _score_entropy_rate_backward_fake(grad_loss, logscore, x_t, x0, h, sigma, lam, perm, perm_inv):
        return lam.new_empty(lam.shape), lam.new_empty(h.shape), lam.new_empty(sigma.shape)

    # ctmc_transition_rows and score_entropy have C++ autograd (csrc/cpu/ctmc_autograd.cpp: the Python wrappers of
    # register_autograd cost about 90 µs per step); the same backward formulas serve the Triton classes above.
    torch.library.register_autograd("slimrate::ctmc_rate_cols", _cols_backward, setup_context=_cols_setup)

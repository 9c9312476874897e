"""Triton kernels of the CTMC ops (docs/dmb.md §2–§4; closed forms as in csrc/kernels/ctmc.h):
rows of exp(h·Q), columns of Q, the transition-row backward and the fused score entropy for DMB's structured Q.

Layout: lam, perm, perm_inv [L, V] (Λ in rank order, rank of each state, state at each rank), token ids
[B, L] int64, flattened into B·L rows of V entries.  Forward programs take BLOCK_R rows × BLOCK_V states; the
backward takes one position and loops over the batch, so dlam needs no atomics and is deterministic.
Computation in lam's dtype (float32 or float64).  Literals are small integers or powers of two, exact in the
float32 constants Triton makes of Python floats, so float64 keeps full precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Entries per program: 4 Ki (16 per thread at 8 warps).  Not tuned on a GPU yet; large blocks also keep the
# interpreter fast (one numpy pass per program).
BLOCK_ELEMS = 4096


@triton.jit
def _one_minus_exp_neg(x):
    """1 − e^{−x} for x ≥ 0: x·(1 − x/2·(1 − x/3·(…(1 − x/16)))) below 0.5 (remainder 0.5^17/17! ≈ 2e-20), keeping
    the relative precision of small x; 1 − exp(−x) above."""
    s = 1.0 - x / 16.0
    for k in tl.static_range(15, 1, -1):
        s = 1.0 - x / k * s
    return tl.where(x < 0.5, x * s, 1.0 - tl.exp(-x))


@triton.jit
def _row_tile(pid, n_rows, L, V, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    ys = tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (ys < V)[None, :]
    return rows, ys, row_ok, mask


@triton.jit
def _state_tables(lam_ptr, perm_ptr, pos_base, ys, mask):
    """Per entry (state y at position l): its rank j, Λ_j and the inflow rate a_{j−1} (0 at rank 0)."""
    j = tl.load(perm_ptr + pos_base[:, None] + ys[None, :], mask=mask, other=0)
    lam_j = tl.load(lam_ptr + pos_base[:, None] + j, mask=mask, other=0.0)
    lam_prev = tl.load(lam_ptr + pos_base[:, None] + j - 1, mask=mask & (j > 0), other=0.0)
    return j, lam_j, tl.where(j > 0, lam_j - lam_prev, 0.0)


@triton.jit
def _transition_rows_kernel(x0_ptr, h_ptr, lam_ptr, perm_ptr, out_ptr, n_rows, L, V,
                            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """out[row, y] = p(y | x0[row]) = 0 (j < k0), E_{k0} (j = k0), E_j·(1 − e^{−h·a_{j−1}}) (j > k0)."""
    rows, ys, row_ok, mask = _row_tile(tl.program_id(0), n_rows, L, V, BLOCK_R, BLOCK_V)
    pos_base = (rows % L) * V
    x0 = tl.load(x0_ptr + rows, mask=row_ok, other=0)
    h = tl.load(h_ptr + rows // L, mask=row_ok, other=0.0)
    k0 = tl.load(perm_ptr + pos_base + x0, mask=row_ok, other=0)
    j, lam_j, rate_j = _state_tables(lam_ptr, perm_ptr, pos_base, ys, mask)
    e = tl.exp(h[:, None] * lam_j)
    f = tl.where(j == k0[:, None], 1.0, _one_minus_exp_neg(h[:, None] * rate_j))
    p = tl.where(j < k0[:, None], 0.0, e * f)
    tl.store(out_ptr + rows[:, None] * V + ys[None, :], p, mask=mask)


@triton.jit
def _rate_cols_kernel(x_ptr, lam_ptr, perm_ptr, out_ptr, n_rows, L, V,
                      BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """out[row, y] = Q[y, x[row]] = a_{k−1} (j < k), Λ_k (j = k), 0 (j > k)."""
    rows, ys, row_ok, mask = _row_tile(tl.program_id(0), n_rows, L, V, BLOCK_R, BLOCK_V)
    pos_base = (rows % L) * V
    x = tl.load(x_ptr + rows, mask=row_ok, other=0)
    k = tl.load(perm_ptr + pos_base + x, mask=row_ok, other=0)
    lam_k = tl.load(lam_ptr + pos_base + k, mask=row_ok, other=0.0)
    lam_prev = tl.load(lam_ptr + pos_base + k - 1, mask=row_ok & (k > 0), other=0.0)
    rate_k = tl.where(k > 0, lam_k - lam_prev, 0.0)
    j = tl.load(perm_ptr + pos_base[:, None] + ys[None, :], mask=mask, other=0)
    out = tl.where(j < k[:, None], rate_k[:, None], tl.where(j == k[:, None], lam_k[:, None], 0.0))
    tl.store(out_ptr + rows[:, None] * V + ys[None, :], out, mask=mask)


@triton.jit
def _transition_backward_kernel(grad_ptr, x0_ptr, h_ptr, lam_ptr, perm_ptr, inv_ptr, dlam_ptr, dh_part_ptr, B, L, V,
                                BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """Position pos = program id: in rank order j, c = E_j·(G'_j − G'_{j+1}) for j ≥ k0;
    dlam[pos, j] = Σ_b h_b·c, dh_part[b, pos] = Σ_j Λ_j·c."""
    pos = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, BLOCK_V).to(tl.int64)
    j_ok = js < V
    next_ok = (js + 1) < V
    inv = tl.load(inv_ptr + pos * V + js, mask=j_ok, other=0)
    inv_next = tl.load(inv_ptr + pos * V + js + 1, mask=next_ok, other=0)
    lam_j = tl.load(lam_ptr + pos * V + js, mask=j_ok, other=0.0)
    acc = tl.zeros([BLOCK_V], dtype=lam_j.dtype)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        b_ok = bs < B
        rows = bs * L + pos
        x0 = tl.load(x0_ptr + rows, mask=b_ok, other=0)
        h = tl.load(h_ptr + bs, mask=b_ok, other=0.0)
        k0 = tl.load(perm_ptr + pos * V + x0, mask=b_ok, other=0)
        tile = b_ok[:, None] & j_ok[None, :]
        g = tl.load(grad_ptr + rows[:, None] * V + inv[None, :], mask=tile, other=0.0)
        g_next = tl.load(grad_ptr + rows[:, None] * V + inv_next[None, :], mask=b_ok[:, None] & next_ok[None, :],
                         other=0.0)
        e = tl.exp(h[:, None] * lam_j[None, :])
        c = tl.where(tile & (js[None, :] >= k0[:, None]), e * (g - g_next), 0.0)
        acc += tl.sum(h[:, None] * c, axis=0)
        tl.store(dh_part_ptr + rows, tl.sum(lam_j[None, :] * c, axis=1), mask=b_ok)
    tl.store(dlam_ptr + pos * V + js, acc, mask=j_ok)


@triton.jit
def _score_entropy_kernel(ls_ptr, xt_ptr, x0_ptr, h_ptr, sigma_ptr, lam_ptr, perm_ptr, loss_row_ptr, grad_ptr,
                          n_rows, L, V, WITH_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """loss_row[row] = w·Σ_{j<k} (e^s − r·s + r(log r − 1)), grad = w·(e^s − r) on j < k, w = σ·a_{k−1},
    r = p(y|x0)/p(x_t|x0) from log p in closed form.  Rows with w = 0 or x_t unreachable give 0 (the Python face
    rejects the latter first)."""
    rows, ys, row_ok, mask = _row_tile(tl.program_id(0), n_rows, L, V, BLOCK_R, BLOCK_V)
    pos_base = (rows % L) * V
    b = rows // L
    xt = tl.load(xt_ptr + rows, mask=row_ok, other=0)
    x0 = tl.load(x0_ptr + rows, mask=row_ok, other=0)
    h = tl.load(h_ptr + b, mask=row_ok, other=0.0)
    sigma = tl.load(sigma_ptr + b, mask=row_ok, other=0.0)
    k = tl.load(perm_ptr + pos_base + xt, mask=row_ok, other=0)
    k0 = tl.load(perm_ptr + pos_base + x0, mask=row_ok, other=0)
    lam_k = tl.load(lam_ptr + pos_base + k, mask=row_ok, other=0.0)
    lam_kp = tl.load(lam_ptr + pos_base + k - 1, mask=row_ok & (k > 0), other=0.0)
    rate_k = tl.where(k > 0, lam_k - lam_kp, 0.0)
    w = sigma * rate_k
    f_k = tl.where(k == k0, 1.0, _one_minus_exp_neg(h * rate_k))
    row_live = row_ok & (w > 0) & (k >= k0) & (f_k > 0)
    logp_k = h * lam_k + tl.log(tl.where(f_k > 0, f_k, 1.0))

    j, lam_j, rate_j = _state_tables(lam_ptr, perm_ptr, pos_base, ys, mask)
    s = tl.load(ls_ptr + rows[:, None] * V + ys[None, :], mask=mask, other=0.0)
    es = tl.exp(s)
    f = tl.where(j == k0[:, None], 1.0, _one_minus_exp_neg(h[:, None] * rate_j))
    has_r = (j >= k0[:, None]) & (f > 0)
    log_r = h[:, None] * lam_j + tl.log(tl.where(has_r, f, 1.0)) - logp_k[:, None]
    r = tl.where(has_r, tl.exp(tl.where(has_r, log_r, 0.0)), 0.0)
    term = es + tl.where(has_r, r * (log_r - 1.0 - s), 0.0)
    active = mask & row_live[:, None] & (j < k[:, None])
    tl.store(loss_row_ptr + rows, w * tl.sum(tl.where(active, term, 0.0), axis=1), mask=row_ok)
    if WITH_GRAD:
        tl.store(grad_ptr + rows[:, None] * V + ys[None, :], tl.where(active, w[:, None] * (es - r), 0.0), mask=mask)


def _blocks(V: int) -> tuple[int, int]:
    block_v = triton.next_power_of_2(max(V, 1))
    return max(1, BLOCK_ELEMS // block_v), block_v


def ctmc_transition_rows_triton(x0, h, lam, perm, perm_inv) -> torch.Tensor:
    """Rows x0 of exp(h·Q): x0 [B, L] int64, h [B], lam/perm [L, V] -> [B, L, V] in lam's dtype."""
    B, L = x0.shape
    V = lam.shape[1]
    out = torch.empty((B, L, V), dtype=lam.dtype, device=lam.device)
    n = B * L
    if n:
        block_r, block_v = _blocks(V)
        _transition_rows_kernel[(triton.cdiv(n, block_r),)](x0.contiguous(), h.contiguous(), lam.contiguous(),
                                                           perm.contiguous(), out, n, L, V, BLOCK_R=block_r,
                                                           BLOCK_V=block_v)
    return out


def ctmc_transition_rows_backward_triton(grad, x0, h, lam, perm, perm_inv) -> tuple[torch.Tensor, torch.Tensor]:
    """(dlam [L, V], dh [B]) of the rows for grad [B, L, V]."""
    B, L = x0.shape
    V = lam.shape[1]
    dlam = torch.zeros_like(lam)
    dh_part = torch.zeros((B, L), dtype=lam.dtype, device=lam.device)
    if B and L:
        block_v = triton.next_power_of_2(V)
        block_b = max(1, min(triton.next_power_of_2(B), BLOCK_ELEMS // block_v))
        _transition_backward_kernel[(L,)](grad.contiguous(), x0.contiguous(), h.contiguous(), lam.contiguous(),
                                         perm.contiguous(), perm_inv.contiguous(), dlam, dh_part, B, L, V,
                                         BLOCK_B=block_b, BLOCK_V=block_v)
    return dlam, dh_part.sum(1)


def ctmc_rate_cols_triton(x, lam, perm, perm_inv) -> torch.Tensor:
    """Column x of Q: x [B, L] int64 -> [B, L, V] in lam's dtype."""
    B, L = x.shape
    V = lam.shape[1]
    out = torch.empty((B, L, V), dtype=lam.dtype, device=lam.device)
    n = B * L
    if n:
        block_r, block_v = _blocks(V)
        _rate_cols_kernel[(triton.cdiv(n, block_r),)](x.contiguous(), lam.contiguous(), perm.contiguous(), out, n, L,
                                                     V, BLOCK_R=block_r, BLOCK_V=block_v)
    return out


def score_entropy_triton(logscore, x_t, x0, h, sigma, lam, perm, perm_inv,
                         with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], d loss / d logscore [B, L, V] or [0]) as the native op; inputs checked by the Python face."""
    B, L = x_t.shape
    V = lam.shape[1]
    loss_row = torch.zeros((B, L), dtype=lam.dtype, device=lam.device)
    grad = torch.empty((B, L, V) if with_grad else (0,), dtype=lam.dtype, device=lam.device)
    n = B * L
    if n:
        block_r, block_v = _blocks(V)
        _score_entropy_kernel[(triton.cdiv(n, block_r),)](
            logscore.detach().contiguous(), x_t.contiguous(), x0.contiguous(), h.contiguous(), sigma.contiguous(),
            lam.contiguous(), perm.contiguous(), loss_row, grad, n, L, V, WITH_GRAD=with_grad, BLOCK_R=block_r,
            BLOCK_V=block_v)
    return loss_row.sum(1), grad

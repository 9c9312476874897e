"""Triton kernel of sparse_linear: y = x·Wᵀ + b for W [out, in] stored block-CSR with blocks (r, c)
(python/slimrate/ops/sparse_format.py), float32 accumulation.

One program per (block row i, tile of BT batch entries) computes y[tile, i·r : i·r + r]: it walks the
row's blocks NJ at a time, NJ = max(1, 16 // c) so each step covers at least 16 weight columns even
for CSR (a (1, 1) step is a gather of 16 nonzeros), and adds W_step [r, NJ·c] @ x_step [NJ·c, BT].
r and c are padded to powers of two (RP, CP) with masks. The product is a broadcast multiply and sum
in float32; tl.dot (exact float32, input_precision="ieee") only when every dimension is >= 16, its
minimum. bfloat16 and float16 are upcast before the product: the interpreter multiplies bfloat16 bit
patterns wrongly in tl.dot (DESIGN.md, "Known pitfalls").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Weight columns per step: 16 is tl.dot's smallest K and keeps CSR steps from being one nonzero long.
STEP_COLUMNS = 16
# Batch entries per program: one warp's worth; batch 1 (SpMV) runs with BT = 1.  Not tuned on a GPU yet.
MAX_BATCH_TILE = 32
# Triton grids allow 65535 programs along axis 1 (the batch tiles).
MAX_GRID_Y = 65535


@triton.jit
def _sparse_linear_kernel(x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, bias_ptr, y_ptr,
                          batch, in_features, out_features, stride_xb, stride_xk,
                          R: tl.constexpr, C: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr,
                          NJ: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                          UINT16_COLS: tl.constexpr):
    """y[b, i·R + a] = Σ_j Σ_k values[j, a, k]·x[b, col_idx[j]·C + k] (+ bias) over block row i's blocks j.

    x [batch, in_features] any strides; values [nblocks, R, C]; y [batch, out_features] contiguous.
    Reads of x past in_features (edge blocks) and of a negative column are masked to zero.
    """
    i = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, RP)                        # [RP] row within the block
    step = tl.arange(0, NJ * CP)                   # [K]: block jj = step // CP of the step, column k
    jj = step // CP
    k = step % CP
    bs = tile * BT + tl.arange(0, BT)              # [BT] batch entries
    b_ok = bs < batch
    begin = tl.load(row_ptr_ptr + i)
    end = tl.load(row_ptr_ptr + i + 1)
    acc = tl.zeros((RP, BT), dtype=tl.float32)
    for j0 in range(begin, end, NJ):
        j = j0 + jj                                # [K] block of each step column
        w_ok = (j < end) & (k < C)
        col = tl.load(col_idx_ptr + j, mask=w_ok, other=0).to(tl.int64)
        if UINT16_COLS:                            # int16 col_idx holds uint16 bits
            col = col & 0xFFFF
        feature = col * C + k                      # [K] input feature
        x_ok = w_ok & (feature >= 0) & (feature < in_features)
        w = tl.load(values_ptr + j[None, :] * (R * C) + rows[:, None] * C + k[None, :],
                    mask=(rows[:, None] < R) & w_ok[None, :], other=0.0).to(tl.float32)          # [RP, K]
        xs = tl.load(x_ptr + bs[None, :] * stride_xb + feature[:, None] * stride_xk,
                     mask=x_ok[:, None] & b_ok[None, :], other=0.0).to(tl.float32)               # [K, BT]
        if USE_DOT:
            acc += tl.dot(w, xs, input_precision="ieee")
        else:
            acc += tl.sum(w[:, :, None] * xs[None, :, :], axis=1)
    out_rows = i * R + rows                        # [RP]
    row_ok = (rows < R) & (out_rows < out_features)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + bs[None, :] * out_features + out_rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & b_ok[None, :])


def sparse_linear_triton(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                         out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·Wᵀ + bias for a block-CSR W [out_features, in]: x [B, in] -> y [B, out_features] in x's dtype.

    x: float32/bfloat16/float16, any strides; values [nblocks, r, c] float32/bfloat16/float16 (may differ
    from x's dtype); col_idx [nblocks] int32 or int16 holding uint16 bits; row_ptr [ceil(out_features / r) + 1]
    int64; bias [out_features] any float dtype or None; all on one device (CUDA, or CPU under TRITON_INTERPRET=1).
    Products and sums in float32, rounded once into x's dtype. Shapes are checked here; the index
    values are trusted (SparseMatrix.from_dense builds them; slimrate.ops.sparse_linear checks them first).
    """
    if x.dim() != 2 or values.dim() != 3:
        raise ValueError(f"x, values: expected 2-D x and 3-D values, got {tuple(x.shape)} and {tuple(values.shape)}")
    batch, in_features = x.shape
    nblocks, r, c = values.shape
    brows = triton.cdiv(out_features, r)
    if col_idx.shape != (nblocks,) or row_ptr.shape != (brows + 1,):
        raise ValueError(f"col_idx, row_ptr: expected shapes ({nblocks},) and ({brows + 1},) for values "
                         f"{tuple(values.shape)} and out_features={out_features}, got {tuple(col_idx.shape)} "
                         f"and {tuple(row_ptr.shape)}")
    y = torch.empty((batch, out_features), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    bt = min(MAX_BATCH_TILE, triton.next_power_of_2(batch))
    tiles = triton.cdiv(batch, bt)
    if tiles > MAX_GRID_Y:
        raise ValueError(f"x: batch {batch} is over the {MAX_GRID_Y * bt} rows one launch covers; split it")
    rp, cp = triton.next_power_of_2(r), triton.next_power_of_2(c)
    nj = max(1, STEP_COLUMNS // cp)
    _sparse_linear_kernel[(brows, tiles)](
        x, row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), y if bias is None else bias.contiguous(), y,
        batch, in_features, out_features, x.stride(0), x.stride(1),
        R=r, C=c, RP=rp, CP=cp, NJ=nj, BT=bt, HAS_BIAS=bias is not None, USE_DOT=rp >= 16 and bt >= 16,
        UINT16_COLS=col_idx.dtype == torch.int16)
    return y

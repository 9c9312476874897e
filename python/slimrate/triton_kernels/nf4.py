"""Triton kernels of the NF4 ops (docs/qlora.md §3; layout in csrc/kernels/nf4.h): W [out, in] flattened into
n weights, weight i in byte i/2 (high nibble when i is even), scaled by absmax[i // blocksize].

- nf4_quantize / nf4_dequantize: one program per quantization block / per BLOCK weights; bit-identical to
  bitsandbytes (float32 products; divisions rounded to nearest, tl.math.div_rn, as the CPU's).
- nf4_lora_linear: y = x·Wᵀ + h·(s·B)ᵀ + b with h = lora_x·Aᵀ [M, r] (a torch GEMM, r ≪ in): one program per
  (BM tokens, BN output rows) decodes W [BN, BK] in registers from the packed bytes, tl.dot with x [BM, BK],
  then adds the LoRA term (tl.dot, r padded to 16) and the bias, float32 accumulation, one rounding.
- nf4_linear_grad_input: dx = g·W + gh·A with gh = s·g·B: one program per (BM tokens, BN input columns), W
  [BK, BN] decoded per step over the output rows.
tl.dot needs every dimension >= 16: tokens and the rank are padded with masks.  bfloat16/float16 operands are
multiplied in their own dtype on a GPU; in the interpreter everything is upcast to float32 first (it multiplies
bfloat16 bit patterns wrongly in tl.dot, DESIGN.md "Known pitfalls").  Tile sizes not tuned on a GPU yet.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
DEQUANT_BLOCK = 1024
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The code table [16] and its 15 midpoints (code[i] + code[i+1]) / 2, padded with +inf to 16, float32."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    mids = torch.cat([(code[:-1] + code[1:]) / 2, torch.full((1,), float("inf"), device=device)])
    return code, mids


@triton.jit
def _decode(packed_ptr, absmax_ptr, code_ptr, idx, mask, blocksize):
    """W_flat[idx] in float32 (0 where masked); idx int64."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 1, byte & 15, byte >> 4)
    scale = tl.load(absmax_ptr + idx // blocksize, mask=mask, other=0.0)
    return tl.load(code_ptr + nibble, mask=mask, other=0.0) * scale


@triton.jit
def _cast(v, ty: tl.constexpr):
    """float32 v rounded to nearest even in ``ty``: by bits for bfloat16, since the interpreter's conversion
    truncates (the GPU's cvt.rn agrees with this one)."""
    if ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ty)


@triton.jit
def _quantize_kernel(w_ptr, packed_ptr, absmax_ptr, mids_ptr, n, BLOCKSIZE: tl.constexpr):
    """Block pid: absmax and its BLOCKSIZE / 2 packed bytes; a partial last block divides, a full one multiplies
    by the reciprocal (bitsandbytes' portable kernel); code index = #midpoints strictly below the value."""
    pid = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCKSIZE // 2)
    even = pid * BLOCKSIZE + 2 * j
    odd = even + 1
    we = tl.load(w_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    wo = tl.load(w_ptr + odd, mask=odd < n, other=0.0).to(tl.float32)
    am = tl.maximum(tl.max(tl.abs(we), axis=0), tl.max(tl.abs(wo), axis=0))
    tl.store(absmax_ptr + pid, am)
    div = tl.maximum(am, tl.full((), 1e-38, tl.float32))
    full = (pid + 1) * BLOCKSIZE <= n
    inv = tl.math.div_rn(tl.full((), 1.0, tl.float32), div)
    se = tl.where(full, we * inv, tl.math.div_rn(we, div))
    so = tl.where(full, wo * inv, tl.math.div_rn(wo, div))
    se = tl.minimum(tl.maximum(se, -1.0), 1.0)
    so = tl.minimum(tl.maximum(so, -1.0), 1.0)
    mids = tl.load(mids_ptr + tl.arange(0, 16))
    qe = tl.sum((se[:, None] > mids[None, :]).to(tl.int32), axis=1)
    qo = tl.sum((so[:, None] > mids[None, :]).to(tl.int32), axis=1)
    qo = tl.where(odd < n, qo, 7)  # an odd n pads with code 7 (0.0)
    tl.store(packed_ptr + pid * (BLOCKSIZE // 2) + j, ((qe << 4) | qo).to(tl.uint8), mask=even < n)


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    w = _decode(packed_ptr, absmax_ptr, code_ptr, idx, mask, blocksize)
    tl.store(out_ptr + idx, _cast(w, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _absmax_scale_kernel(q_ptr, code_ptr, absmax2_ptr, out_ptr, nb, blocksize, BLOCK: tl.constexpr):
    """out = code[q]·absmax2[i // blocksize]; the offset is added by a separate pass, so the compiler cannot fuse
    the two into an FMA (bitsandbytes rounds the product first)."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < nb
    q = tl.load(q_ptr + i, mask=mask, other=0).to(tl.int32)
    scaled = tl.load(code_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + i // blocksize, mask=mask, other=0.0)
    tl.store(out_ptr + i, scaled, mask=mask)


@triton.jit
def _lora_linear_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, h_ptr, bs_ptr, bias_ptr, y_ptr,
                        M, N, K, R, blocksize, stride_xm, stride_xk,
                        HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr, RP: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[BM tokens, BN rows] = x·Wᵀ + h·Bsᵀ + b; x [M, K] any strides, h [M, R] and Bs = s·B [N, R] float32
    contiguous, y [M, N] contiguous."""
    pm = tl.program_id(0).to(tl.int64)
    pn = tl.program_id(1).to(tl.int64)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)                                                                   # [BM, BK]
        idx = rn[None, :] * K + rk[:, None]                                                        # [BK, BN]
        w = _decode(packed_ptr, absmax_ptr, code_ptr, idx, k_ok[:, None] & n_ok[None, :], blocksize)
        if F32_DOT:
            acc += tl.dot(xs.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(xs, w.to(xs.dtype))
    rr = tl.arange(0, RP)
    r_ok = rr < R
    h = tl.load(h_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)   # [BM, RP]
    bsT = tl.load(bs_ptr + rn[None, :] * R + rr[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [RP, BN]
    acc += tl.dot(h, bsT, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], _cast(acc, y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_input_kernel(g_ptr, packed_ptr, absmax_ptr, code_ptr, gh_ptr, a_ptr, dx_ptr,
                       M, N, K, R, blocksize, stride_gm, stride_gn,
                       HAS_LORA: tl.constexpr, F32_DOT: tl.constexpr, RP: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dx[BM tokens, BN input columns] = g·W + gh·A; g [M, N] any strides, gh [M, R], A [R, K] float32
    contiguous, dx [M, K] contiguous.  Here N = out (the reduction) and K = in."""
    pm = tl.program_id(0).to(tl.int64)
    pk = tl.program_id(1).to(tl.int64)
    rm = pm * BM + tl.arange(0, BM)
    rk = pk * BN + tl.arange(0, BN)
    m_ok = rm < M
    k_ok = rk < K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for o0 in range(0, N, BK):
        ro = o0 + tl.arange(0, BK)
        o_ok = ro < N
        gs = tl.load(g_ptr + rm[:, None] * stride_gm + ro[None, :] * stride_gn, mask=m_ok[:, None] & o_ok[None, :],
                     other=0.0)                                                                   # [BM, BK]
        idx = ro[:, None] * K + rk[None, :]                                                        # [BK, BN]
        w = _decode(packed_ptr, absmax_ptr, code_ptr, idx, o_ok[:, None] & k_ok[None, :], blocksize)
        if F32_DOT:
            acc += tl.dot(gs.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(gs, w.to(gs.dtype))
    if HAS_LORA:
        rr = tl.arange(0, RP)
        r_ok = rr < R
        gh = tl.load(gh_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(gh, a, input_precision="ieee")
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], _cast(acc, dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def _f32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or _INTERPRETED


def nf4_quantize_triton(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any shape, float32/bfloat16/float16, contiguous) -> packed uint8 [(n+1)//2, 1], absmax float32."""
    n = w.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=w.device)
    if nblocks:
        _quantize_kernel[(nblocks,)](w.reshape(-1), packed, absmax, _tables(w.device)[1], n, BLOCKSIZE=blocksize)
    return packed, absmax


def nf4_dequantize_triton(packed: torch.Tensor, absmax: torch.Tensor, shape: list[int], blocksize: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """W [shape] in dtype from packed uint8 ((n+1)//2 bytes) and absmax float32."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    if n:
        _dequantize_kernel[(triton.cdiv(n, DEQUANT_BLOCK),)](packed.reshape(-1), absmax, _tables(packed.device)[0],
                                                             out, n, blocksize, BLOCK=DEQUANT_BLOCK)
    return out


def nf4_absmax_dequantize_triton(qabsmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor,
                                 offset: torch.Tensor, blocksize: int) -> torch.Tensor:
    """absmax float32 [nb] = code[qabsmax]·absmax2[i // blocksize] + offset."""
    out = torch.empty(qabsmax.numel(), dtype=torch.float32, device=qabsmax.device)
    if out.numel():
        _absmax_scale_kernel[(triton.cdiv(out.numel(), DEQUANT_BLOCK),)](
            qabsmax.reshape(-1), code.float().contiguous(), absmax2.float().contiguous(), out, out.numel(), blocksize,
            BLOCK=DEQUANT_BLOCK)
    return out.add_(offset.float().reshape(()))


def nf4_lora_linear_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int,
                           blocksize: int, lora_x: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scaling: float, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, out] in x's dtype = x·Wᵀ + scaling·(lora_x·Aᵀ)·Bᵀ + bias; x [M, in] any strides (checked by the caller)."""
    M, K = x.shape
    N, R = out_features, lora_A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    h = ((x if lora_x is None else lora_x).float() @ lora_A.float().t()).contiguous()   # [M, R]
    bs = (lora_B.float() * scaling).contiguous()                                          # [N, R]
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _lora_linear_kernel[grid](x, packed.reshape(-1), absmax, _tables(x.device)[0], h, bs,
                              y if bias is None else bias.contiguous(), y, M, N, K, R, blocksize,
                              x.stride(0), x.stride(1), HAS_BIAS=bias is not None, F32_DOT=_f32_dot(x.dtype),
                              RP=_rank_pad(R), BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return y


def nf4_linear_grad_input_triton(grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                                 in_features: int, blocksize: int, lora_grad_h: torch.Tensor | None,
                                 lora_A: torch.Tensor | None) -> torch.Tensor:
    """dx [M, in] in grad_y's dtype = grad_y·W + lora_grad_h·lora_A (both None: no LoRA term)."""
    M, N = grad_y.shape
    K = in_features
    dx = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device)
    if dx.numel() == 0:
        return dx
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 1
    gh = lora_grad_h.float().contiguous() if has_lora else dx
    a = lora_A.float().contiguous() if has_lora else dx
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_N))
    _grad_input_kernel[grid](grad_y, packed.reshape(-1), absmax, _tables(grad_y.device)[0], gh, a, dx, M, N, K, R,
                             blocksize, grad_y.stride(0), grad_y.stride(1), HAS_LORA=has_lora,
                             F32_DOT=_f32_dot(grad_y.dtype), RP=_rank_pad(R), BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return dx

"""Triton kernels of the BackSlash rate ops (docs/backslash.md §2): moment statistics and the
fused rate-proxy gradient, one launch per tensor, deterministic per-program partial sums.

R(θ) = (1/N) Σ_i (|θ_i| + ε)^ν over every element of every tensor.

Precision: per-program partial sums are float64 and are added on the host side with torch in a
fixed order, so results do not depend on scheduling.  A float32 tree sum over one block of
BLOCK_SIZE = 2^11 elements has a worst-case relative error of 11·2^-24 = 5.5 float32 ulps, over the
4-ulp budget of STYLE.md's error rule for float32 inputs, and far over it for float64 inputs.
float64 runs at half the float32 rate on H100/A100, where these memory-bound passes keep their
speed; on consumer GPUs (float64 at 1/64 rate) the reduction may become compute-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: 16 per thread at 4 warps.  Not tuned on a GPU yet; larger blocks also keep
# the interpreter fast (it runs one numpy pass per program).
BLOCK_SIZE = 2048


@triton.jit
def _rate_stats_kernel(x_ptr, partial_ptr, n, BLOCK_SIZE: tl.constexpr):
    """partial[pid] = (Σ|x|, Σx²) over this program's block of x (n,), in float64."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    # Widening is exact for every input dtype, and x² of a float64 value needs float64.
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    # One slot pair per program: the grid has exactly as many programs as partial_ptr has pairs.
    tl.store(partial_ptr + 2 * pid, tl.sum(tl.abs(x), axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(x * x, axis=0))


@triton.jit
def _rate_grad_kernel(param_ptr, grad_ptr, scalars_ptr, partial_ptr, n,
                      COMPUTE_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """grad += coef·sign(θ)·(|θ|+ε)^(ν−1) over this program's block; partial[pid] = Σ (|θ|+ε)^ν.

    param_ptr, grad_ptr: (n,) of one dtype, possibly the same memory (each element is loaded before
    it is stored, by the same program).  scalars_ptr: float64 (3,) = (coef, ν−1, ε); float64 so that
    float64 inputs get full precision (Triton passes Python floats as float32).  COMPUTE_DTYPE:
    float32 for 16/32-bit storage, float64 for float64.
    """
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    # Three scalars of a buffer the launcher allocates with exactly three elements.
    coef = tl.load(scalars_ptr).to(COMPUTE_DTYPE)
    exponent = tl.load(scalars_ptr + 1).to(COMPUTE_DTYPE)
    eps = tl.load(scalars_ptr + 2).to(COMPUTE_DTYPE)
    theta = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)

    a = tl.abs(theta) + eps
    # With ε = 0 a zero weight would give 0^(ν−1) = inf and 0·inf = NaN: its terms are 0 instead.
    zero = a == 0.0
    power = tl.exp2(exponent * tl.log2(tl.where(zero, 1.0, a)))  # (|θ|+ε)^(ν−1)
    power = tl.where(zero, 0.0, power)
    sign = (theta > 0).to(COMPUTE_DTYPE) - (theta < 0).to(COMPUTE_DTYPE)
    tl.store(grad_ptr + offsets, (grad + coef * sign * power).to(grad_ptr.dtype.element_ty), mask=mask)

    # Masked lanes hold θ = 0, whose (0+ε)^ν is not 0 when ε > 0.
    rate = tl.where(mask, a * power, 0.0).to(tl.float64)  # (|θ|+ε)^ν
    # One slot per program: the grid has exactly as many programs as partial_ptr has slots.
    tl.store(partial_ptr + pid, tl.sum(rate, axis=0))


def _programs(numel: int) -> int:
    return triton.cdiv(numel, BLOCK_SIZE)


def rate_stats_triton(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(N, Σ|θ|, Σθ²) over a non-empty list of tensors of any shapes.

    tensors: float16/bfloat16/float32/float64, one device (CUDA, or CPU under TRITON_INTERPRET=1);
    non-contiguous tensors are read through contiguous copies.  Returns float64 (3,) on that device;
    nothing is modified.
    """
    device = tensors[0].device
    counts = [_programs(t.numel()) for t in tensors]
    partials = torch.empty((sum(counts), 2), dtype=torch.float64, device=device)  # (programs, 2)
    start = 0
    for t, count in zip(tensors, counts, strict=True):
        if count:
            _rate_stats_kernel[(count,)](t.contiguous(), partials[start:], t.numel(), BLOCK_SIZE=BLOCK_SIZE)
        start += count
    sums = partials.sum(0)  # (2,)
    n = sum(t.numel() for t in tensors)
    return torch.cat([sums.new_tensor([float(n)]), sums])


def rate_grad_triton(params: list[torch.Tensor], grads: list[torch.Tensor], lam: float, nu: float,
                     eps: float) -> torch.Tensor:
    """Add lam·∂R/∂θ into each grad in place and return R, one fused pass per tensor.

    params, grads: non-empty matching lists, grads[i] of params[i]'s shape and dtype (float16,
    bfloat16, float32, float64), one device (CUDA, or CPU under TRITON_INTERPRET=1).  grads[i] may
    be params[i] itself.  In place: grads[i] += lam·(ν/N)·sign(θ)·(|θ|+ε)^(ν−1), N = Σ numel,
    sign(0) = 0 (also when ε = 0), computed in float32 (float64 for float64 tensors) and rounded
    once into the grad's dtype; a non-contiguous grad is updated through a contiguous copy.
    Returns R = (1/N) Σ (|θ|+ε)^ν as a float64 () tensor on that device; 0 when N = 0, with grads
    untouched.
    """
    device = params[0].device
    n = sum(p.numel() for p in params)
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    scalars = torch.tensor([lam * (nu / n), nu - 1.0, eps], dtype=torch.float64, device=device)
    counts = [_programs(p.numel()) for p in params]
    partials = torch.empty(sum(counts), dtype=torch.float64, device=device)  # (programs,)
    start = 0
    for p, g, count in zip(params, grads, counts, strict=True):
        if count:
            # When g is p and not contiguous, these are two separate copies: θ stays unmodified
            # while the kernel writes the copy of g, which then goes back into g (= p).
            theta, grad = p.contiguous(), g.contiguous()
            compute = tl.float64 if p.dtype == torch.float64 else tl.float32
            _rate_grad_kernel[(count,)](theta, grad, scalars, partials[start:], p.numel(),
                                        COMPUTE_DTYPE=compute, BLOCK_SIZE=BLOCK_SIZE)
            if grad is not g:
                g.copy_(grad)
        start += count
    return partials.sum() / n

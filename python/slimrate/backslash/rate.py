"""Differentiable BackSlash rate proxy R(θ) = (1/N)·Σ_i (|θ_i| + ε)^ν, for use as a loss term.

docs/backslash.md §2 (formula) and §4 (mode "loss": J = D + λ·R, gradient through the optimizer).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from slimrate.ops import rate_grad_
from slimrate.ops.checks import finite_number, float_tensor_list


class _Rate(torch.autograd.Function):
    """R and ∂R/∂θ in one fused ``ops.rate_grad_`` pass; backward scales the saved ∂R/∂θ."""

    @staticmethod
    def forward(ctx, nu: float, eps: float, *params: torch.Tensor) -> torch.Tensor:
        grads = [torch.zeros_like(p) for p in params]  # ∂R/∂θ lands here, in each param's dtype
        value = rate_grad_(params, grads, 1.0, nu, eps)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # ∂R/∂θ is saved as data, so a graph built through it would silently drop R's Hessian.
        # (once_differentiable would not catch create_graph=True when grad_out is a constant.)
        if torch.is_grad_enabled():
            raise RuntimeError("rate(...) is not twice differentiable: backward with create_graph=True "
                               "would drop R's second derivative; differentiate it once")
        return (None, None, *(grad_out.to(g.dtype) * g for g in ctx.saved_tensors))


def rate(tensors: Iterable[torch.Tensor], nu: float, eps: float = 1.0) -> torch.Tensor:
    """R(θ) = (1/N)·Σ (|θ| + ε)^ν over every element of ``tensors``, differentiable in θ.

    tensors: float16/bfloat16/float32/float64 of any shape, one device; N = total element count.
    nu: shape ν > 0, held constant (pass ``estimate_shape(...)`` for the adaptive proxy; it gets no
    gradient).  eps: soft clipping ε ≥ 0 (the authors' re-implementation uses 1).
    Returns a float64 [] tensor (the sums are float64).  Add ``lam * rate(...)`` to the loss; with a
    0-dim float32 loss the sum is promoted to float64, which backpropagates fine (or ``.float()`` it).
    Gradients reach each tensor in its own dtype: ∂R/∂θ = (ν/N)·sign(θ)·(|θ|+ε)^(ν−1), sign(0) = 0.
    One fused pass computes R and ∂R/∂θ in the forward; it keeps one gradient-sized buffer per tensor
    until backward.  Not twice differentiable.
    """
    if isinstance(tensors, Iterable) and not isinstance(tensors, torch.Tensor):
        tensors = list(tensors)  # a generator is read twice below: once to check, once to apply
    float_tensor_list("tensors", tensors)  # checks only: it returns detached copies
    nu = finite_number("nu", nu, positive=True)
    eps = finite_number("eps", eps, nonnegative=True)
    return _Rate.apply(nu, eps, *tensors)

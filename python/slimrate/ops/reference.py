"""Plain-PyTorch ground truth for every slimrate op: readable over fast, exact in float64.

Tests, benchmarks and ``backend="reference"`` all call these; nothing else re-implements them.
Element-wise work is done in the inputs' own dtype (so running it on float64 copies gives the
truth and on low-precision inputs gives the error a plain PyTorch user would see); sums are float64.
"""

from __future__ import annotations

import torch


def rate_stats(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(N, Σ|θ|, Σθ²) over all tensors, float64 [3] on their device."""
    device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.zeros(3, dtype=torch.float64, device=device)
    for t in tensors:
        x = t.double()
        out += torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64, device=device),
                            x.abs().sum(), (x * x).sum()])
    return out


def rate_grad_(params: list[torch.Tensor], grads: list[torch.Tensor], lam: float, nu: float,
               eps: float) -> torch.Tensor:
    """grads[i] += lam·(ν/N)·sign(θ)·(|θ|+ε)^(ν−1) in place; returns R = (1/N) Σ (|θ|+ε)^ν, float64 [].

    N is the total element count of params; papers/backslash.md §2 and §4.
    """
    device = params[0].device if params else torch.device("cpu")
    n = sum(p.numel() for p in params)
    total = torch.zeros((), dtype=torch.float64, device=device)
    if n == 0:
        return total
    for p, g in zip(params, grads, strict=False):
        a = p.abs() + eps
        total += (a ** nu).double().sum()
        # sign(0) = 0 even where (0 + ε)^(ν−1) is infinite (ε = 0, ν < 1)
        g.add_(lam * (nu / n) * torch.sign(p) * torch.where(a > 0, a, 1) ** (nu - 1))
    return total / n

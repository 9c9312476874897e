"""Benchmark inputs: a model-sized parameter list with its gradients.

The list has the tensor mix of a small GPT-style transformer (BackSlash, arXiv:2504.16968, trains models like
this): a token embedding (V × d), then per layer four attention projections (d × d), an MLP
up/down pair (4d × d, d × 4d), their biases and two LayerNorms (vectors), and a final LayerNorm:
1 + 4 layers × 12 + 2 = 51 tensors.  The width d sets the bulk of the size and the vocabulary V
fills the rest, so the total lands within one row of the target.
"""

from __future__ import annotations

import torch

N_LAYERS = 4
MLP_RATIO = 4
WIDTH_MULTIPLE = 64  # d rounded like real model widths
PARAM_STD = 0.02  # GPT-2 / Llama initialisation scale: θ ~ N(0, 0.02²)
GRAD_STD = 1e-3  # a typical gradient magnitude; grads are random, never zeros
# ≈ params per d² : N_LAYERS · (4 attention + 2·MLP_RATIO MLP) + the embedding's 8·d·d share
PARAMS_PER_WIDTH_SQUARED = N_LAYERS * (4 + 2 * MLP_RATIO) + 8

SIZES = {"1M": 1_000_000, "16M": 16_000_000, "64M": 64_000_000}


def transformer_shapes(total: int) -> list[tuple[int, ...]]:
    """Shapes of a 51-tensor transformer whose element count is within one embedding row of total."""
    widths = round((total / PARAMS_PER_WIDTH_SQUARED) ** 0.5 / WIDTH_MULTIPLE)
    d = max(1, widths) * WIDTH_MULTIPLE
    ff = MLP_RATIO * d
    layer = [(d, d)] * 4 + [(ff, d), (ff,), (d, ff), (d,), (d,), (d,), (d,), (d,)]
    shapes = layer * N_LAYERS + [(d,), (d,)]  # final LayerNorm weight and bias
    rest = total - sum(_numel(s) for s in shapes)
    if rest < d:
        raise ValueError(f"total: {total} is too small for a {N_LAYERS}-layer model of width {d}")
    return [(rest // d, d)] + shapes  # embedding first, as in a state_dict


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_params(total: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 requires_grad: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params, grads) for a transformer of ≈ total elements; θ ~ N(0, 0.02²), g ~ N(0, 0.001²),
    drawn on the CPU (the same values on every device) and moved to ``device``.

    With requires_grad, params are leaf tensors whose .grad is the returned grad tensor, so a
    `.backward()` accumulates into the same memory that `rate_grad_` updates.
    """
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in transformer_shapes(total):
        p = (torch.randn(shape, generator=gen) * PARAM_STD).to(dtype=dtype, device=device)
        g = (torch.randn(shape, generator=gen) * GRAD_STD).to(dtype=dtype, device=device)
        if requires_grad:
            p.requires_grad_(True)
            p.grad = g
        params.append(p)
        grads.append(g)
    return params, grads

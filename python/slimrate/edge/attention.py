"""Causal attention traced as bmm · scale + constant mask → softmax → bmm, ops the XNNPACK delegate takes.

ExecuTorch decomposes ``F.scaled_dot_product_attention(is_causal=True)`` with a "safe softmax" that zeroes fully
masked rows: ``eq``, ``any``, ``logical_not`` and ``where`` that XNNPACK does not take, so they run on the portable
kernels (about 8 ms of a 38 ms call of the d512 char transformer at 128 tokens). With ``is_causal=True`` every
query row i keeps key 0 (the mask is the upper triangle above the diagonal, top-left aligned as torch's), so no row
is fully masked and plain softmax gives the same result. ``causal_attention_as_matmuls`` is active only while
``slimrate.edge.export`` traces the module; the module's eager code is untouched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def causal_mask(queries: int, keys: int) -> torch.Tensor:
    """(queries, keys) float32: 0 where key j ≤ query i, −inf above the diagonal (``is_causal=True``'s mask).

    Built from numpy so that torch.export stores it as one constant of the program, not as ops run per call."""
    return torch.tensor(np.triu(np.full((queries, keys), -np.inf, dtype=np.float32), 1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """softmax(q kᵀ · scale + causal mask) v for q (B, nh, L, hs), k (B, nh, S, hs), v (B, nh, S, hv).

    Returns (B, nh, L, hv) laid out as (B, L, nh, hv) in memory, as torch's CPU attention returns it (the
    traced graph's views after the call were recorded for that layout)."""
    B, nh, L, hs = q.shape
    S, hv = k.shape[2], v.shape[3]
    scores = torch.bmm(q.reshape(B * nh, L, hs), k.reshape(B * nh, S, hs).transpose(1, 2))  # (B·nh, L, S)
    scores = scores * (hs ** -0.5 if scale is None else scale) + causal_mask(L, S)
    y = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * nh, S, hv)).view(B, nh, L, hv)
    return y.transpose(1, 2).contiguous().transpose(1, 2)


def is_plain_causal(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False) -> bool:
    """Whether a scaled_dot_product_attention call is one causal_attention computes exactly: causal, no mask,
    no dropout, no grouped heads, float32 4-D q/k/v with one shape but the sequence lengths, at least one key."""
    tensors = (q, k, v)
    return (is_causal and attn_mask is None and dropout_p == 0.0 and not enable_gqa
            and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 4 for t in tensors)
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and q.shape[3] == k.shape[3] and k.shape[2] == v.shape[2]
            and k.shape[2] > 0)


class causal_attention_as_matmuls(TorchFunctionMode):  # noqa: N801  (used as a context manager, like no_grad)
    """Within this context, plain causal ``F.scaled_dot_product_attention`` calls run as ``causal_attention``;
    every other call, and every other function, runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and is_plain_causal(*args, **kwargs):
            q, k, v = args[:3]
            return causal_attention(q, k, v, kwargs.get("scale", args[6] if len(args) > 6 else None))
        return func(*args, **kwargs)

"""The sparse linear op: y = x·Wᵀ + b with W stored block-sparse (slimrate.sparse.SparseMatrix).

Inference only: no autograd (the backward of a pruned layer is a dense-layer concern).
"""

from __future__ import annotations

import torch

from slimrate.ops.backend import extension_available, pick_backend
from slimrate.sparse.format import SPARSE_DTYPES, SparseMatrix


def sparse_linear(x: torch.Tensor, weight: SparseMatrix, bias: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """x [..., in] (float32/bfloat16/float16, any strides) -> [..., out] in x's dtype, like F.linear.

    weight: a SparseMatrix of shape (out, in) on x's device; bias: [out] float or None.
    Products are accumulated in float32 on every backend.
    """
    if not isinstance(weight, SparseMatrix):
        raise TypeError(f"weight: expected a slimrate.sparse.SparseMatrix, got {type(weight).__name__}; build one "
                        "with SparseMatrix.from_dense(linear.weight)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SPARSE_DTYPES:
        raise TypeError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected shape [..., {in_features}] to match weight {weight.shape}, "
                         f"got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x: on {x.device} but weight is on {weight.device}; move one with .to(device)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias: expected a float tensor or None, got {type(bias).__name__}")
        if bias.shape != (out_features,) or bias.device != x.device:
            raise ValueError(f"bias: expected shape ({out_features},) on {x.device}, got {tuple(bias.shape)} "
                             f"on {bias.device}")
    return sparse_linear_unchecked(x, weight.row_ptr, weight.col_idx, weight.values, out_features, bias, backend)


def sparse_linear_unchecked(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                            out_features: int, bias: torch.Tensor | None, backend: str | None = None) -> torch.Tensor:
    """sparse_linear after the argument checks (SparseLinear.forward's fast path; the native kernels still
    check the indices): x [..., in] -> [..., out_features]."""
    y = pick_backend("sparse_linear", backend, x.device)(x.reshape(-1, x.shape[-1]), row_ptr, col_idx, values,
                                                          out_features, bias)
    return y.reshape(*x.shape[:-1], out_features)


if extension_available():
    @torch.library.register_fake("slimrate::sparse_linear")
    def _sparse_linear_fake(x, row_ptr, col_idx, values, out_features, bias):
        return x.new_empty((x.shape[0], out_features))

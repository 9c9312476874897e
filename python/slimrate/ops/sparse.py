"""The sparse linear op: y = x·Wᵀ + b with W stored block-sparse (a SparseMatrix, ops/sparse_format.py).

Inference only: no autograd (the backward of a pruned layer is a dense-layer concern).
Input checks: a SparseMatrix checks its whole structure when it is made (block order included); here its
shapes, dtypes and devices again, and x and bias; the index data in the compiled glue for the native backend
(csrc/sparse_inputs.h) and in ``check_block_indices`` for the others, on every call.
"""

from __future__ import annotations

import torch

from slimrate.ops.backend import extension_available, pick_backend
from slimrate.ops.checks import check_bias, check_tensor
from slimrate.ops.sparse_format import SPARSE_DTYPES, SparseMatrix, check_sparse_matrix


def sparse_linear(x: torch.Tensor, weight: SparseMatrix, bias: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """x [..., in] (float32/bfloat16/float16, any strides) -> [..., out] in x's dtype, like F.linear.

    weight: a SparseMatrix of shape (out, in) on x's device; bias: [out] float or None.
    Products are accumulated in float32 on every backend.
    """
    out_features, in_features = check_sparse_matrix(weight).shape
    check_tensor("x", x, dtypes=SPARSE_DTYPES)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected shape [..., {in_features}] to match weight {weight.shape}, "
                         f"got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x: on {x.device} but weight is on {weight.device}; move one with .to(device)")
    check_bias(bias, out_features, x.device)
    return sparse_linear_unchecked(x, weight.row_ptr, weight.col_idx, weight.values, out_features, bias, backend)


def sparse_linear_unchecked(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                            out_features: int, bias: torch.Tensor | None, backend: str | None = None) -> torch.Tensor:
    """sparse_linear after the argument checks (SparseLinear.forward's fast path; the index data is still
    checked on every backend): x [..., in] -> [..., out_features]."""
    if torch.compiler.is_exporting():
        # torch.export records the reshape below as a view of x's strides at trace time; a decomposition run
        # after it (ExecuTorch's of scaled_dot_product_attention, for one) can hand this layer a transposed x,
        # which no view can flatten. A recorded copy to contiguous rows always can.
        x = x.clone(memory_format=torch.contiguous_format)
    y = pick_backend("sparse_linear", backend, x.device)(x.reshape(-1, x.shape[-1]), row_ptr, col_idx, values,
                                                          out_features, bias)
    return y.reshape(*x.shape[:-1], out_features)


if extension_available():
    @torch.library.register_fake("slimrate::sparse_linear")
    def _sparse_linear_fake(x, row_ptr, col_idx, values, out_features, bias):
        return x.new_empty((x.shape[0], out_features))

    # The out variant (ExecuTorch's memory planning turns the op into it, docs/edge.md §2): out is [B, out_features]
    # in x's dtype already when it is traced.
    @torch.library.register_fake("slimrate::sparse_linear.out")
    def _sparse_linear_out_fake(x, row_ptr, col_idx, values, out_features, bias, *, out):
        return out

"""Triton kernels, installed as slimrate.triton_kernels; each launcher is named <op>_triton."""

from slimrate.triton_kernels.rate import rate_grad_triton, rate_stats_triton
from slimrate.triton_kernels.sparse import sparse_linear_triton

__all__ = ["rate_grad_triton", "rate_stats_triton", "sparse_linear_triton"]

"""Sparse pruned inference: magnitude pruning, block-sparse storage, SparseLinear, model conversion."""

from slimrate.sparse.format import SparseMatrix

__all__ = ["SparseMatrix"]

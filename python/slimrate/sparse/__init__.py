"""Sparse pruned inference: magnitude pruning, block-sparse storage, SparseLinear, model conversion."""

from slimrate.ops.sparse_format import SparseMatrix
from slimrate.sparse.linear import SparseLinear, SparsifyDecision, format_decisions, sparsify
from slimrate.sparse.prune import LayerSparsity, format_sparsity_report, prune_, sparsity_report

__all__ = ["LayerSparsity", "SparseLinear", "SparseMatrix", "SparsifyDecision", "format_decisions",
           "format_sparsity_report", "prune_", "sparsify", "sparsity_report"]

"""export: an nn.Module to an ExecuTorch program (.pte), slimrate's layers kept as custom ops (docs/edge.md §1).

torch.export captures the module as one graph for the example inputs' shapes; to_edge_transform_and_lower turns
it into ExecuTorch's edge dialect and, for backend="xnnpack", hands the dense ops XNNPACK supports (linear, matmul,
…) to the XNNPACK delegate; to_executorch plans memory, which turns each functional op into its out variant
(``slimrate::sparse_linear`` into ``slimrate::sparse_linear.out``), and serialises the program. A SparseLinear's
buffers (values, int16/int32 block columns, row_ptr) become the program's constants as they are: the .pte holds
the compact weights, not a dense copy.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from slimrate.edge.attention import causal_attention_as_matmuls
from slimrate.files import write_bytes_atomic

BACKENDS = ("xnnpack", "portable")


def check_example_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """example_inputs as a tuple of tensors (TypeError naming what was given)."""
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        got = type(example_inputs).__name__ if not isinstance(example_inputs, tuple) else \
            f"a tuple of {tuple(type(t).__name__ for t in example_inputs)}"
        raise TypeError(f"example_inputs: expected a tuple of tensors, one per forward argument, got {got}; "
                        "wrap a single input as (x,)")
    return example_inputs


def export(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | os.PathLike, *,
           backend: str = "xnnpack") -> Path:
    """Write ``module`` as an ExecuTorch program to ``path`` (replaced atomically); returns the path.

    module: an nn.Module in eval mode on the CPU; its SparseLinear layers export as ``slimrate::sparse_linear``
        calls (their weights stored compact), everything else as ATen ops.
    example_inputs: a tuple of tensors, one per forward argument: the program takes exactly these shapes and
        dtypes (e.g. (x,) with x (1, 64) float32 for batch 1).
    backend: "xnnpack" runs the dense ops XNNPACK supports in its delegate (causal attention included, traced as
        matmuls and softmax), "portable" leaves every op to ExecuTorch's own kernels; slimrate's ops run on
        slimrate's kernels either way.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if module.training:
        raise ValueError("module: is in training mode (dropout would be exported); call module.eval() first")
    check_example_inputs(example_inputs)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    devices = {t.device.type for t in (*example_inputs, *module.parameters(), *module.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"module, example_inputs: expected CPU tensors, got tensors on {sorted(devices)}; "
                         "move them with .cpu()")
    from executorch.exir import to_edge_transform_and_lower

    # For XNNPACK, causal attention is traced as matmuls, softmax and a constant mask, all delegated (attention.py).
    with torch.no_grad(), causal_attention_as_matmuls() if backend == "xnnpack" else contextlib.nullcontext():
        program = torch.export.export(module, example_inputs)
    partitioners = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners = [XnnpackPartitioner()]
    edge = to_edge_transform_and_lower(program, partitioner=partitioners)
    return write_bytes_atomic(path, edge.to_executorch().buffer)

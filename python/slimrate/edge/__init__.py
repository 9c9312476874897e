"""slimrate on ExecuTorch (docs/edge.md): export a model whose pruned layers are SparseLinear to a .pte program
with slimrate's ops as custom ops, and run it with slimrate's kernels registered in ExecuTorch's runtime.

    slimrate.edge.export(model.eval(), (x,), "model.pte")           # backend="xnnpack" (default) or "portable"
    program = slimrate.edge.load("model.pte"); y = program(x)        # executorch.runtime, our kernels included

Importing this package loads libslimrate_edge.so (``make edge``) into the process's ExecuTorch runtime, so
``executorch.runtime.Runtime.get().load_program(path)`` runs programs with slimrate's ops too.
"""

from slimrate.edge.export import BACKENDS, export
from slimrate.edge.kernels import KERNEL_LIBRARY, load_kernels
from slimrate.edge.program import EdgeProgram, load

load_kernels()

__all__ = ["BACKENDS", "KERNEL_LIBRARY", "EdgeProgram", "export", "load", "load_kernels"]

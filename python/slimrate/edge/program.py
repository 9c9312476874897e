"""load: an ExecuTorch program (.pte) run through ``executorch.runtime``, with slimrate's kernels registered."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slimrate.edge.kernels import load_kernels

# ExecuTorch's ScalarType codes (MethodMeta's dtype()), numbered as c10/core/ScalarType.h numbers them.
SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 5: torch.float16,
                6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16}


class EdgeProgram:
    """The ``forward`` method of a .pte file, loaded once; ``program(*inputs)`` runs it.

    Inputs are checked against the method's metadata (count, shape, dtype) before a call, so a wrong input is a
    ValueError naming it instead of a runtime error code.
    """

    def __init__(self, path: str | os.PathLike):
        load_kernels()
        from executorch.runtime import Runtime

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"path: {self.path} is not a file (expected an ExecuTorch .pte program)")
        try:
            program = Runtime.get().load_program(self.path)
            self._method = program.load_method("forward")
        except (RuntimeError, KeyError) as e:  # the runtime's errors are bare codes; its log says more
            raise ValueError(f"{self.path}: not a valid ExecuTorch program, or one whose operators are not "
                             f"registered ({e}); export it again with slimrate.edge.export") from e
        self._program = program  # the method's data lives in the program
        meta = self._method.metadata
        specs = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
        self.input_specs = [(tuple(spec.sizes()), SCALAR_TYPES.get(spec.dtype())) for spec in specs]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run forward on ``inputs`` (CPU tensors of the exported shapes and dtypes); one output is returned as
        a tensor, several as a tuple. RuntimeError naming the file when a kernel refuses its inputs (e.g. a
        corrupt sparse weight)."""
        if len(inputs) != len(self.input_specs):
            raise ValueError(f"inputs: {self.path} takes {len(self.input_specs)} inputs, got {len(inputs)}")
        for i, (x, (shape, dtype)) in enumerate(zip(inputs, self.input_specs, strict=True)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dtype != dtype:
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"inputs[{i}]: expected a tensor of shape {shape} and dtype {dtype} (the exported "
                                 f"example's), got {got}")
        try:
            outputs = self._method.execute([x.contiguous() for x in inputs])
        except RuntimeError as e:  # a kernel's failed check: a bare code here, the reason in the runtime's log
            raise RuntimeError(f"{self.path}: forward failed ({e}); the ExecuTorch log on stderr names the operator "
                               "and the check that failed") from e
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load(path: str | os.PathLike) -> EdgeProgram:
    """The .pte program at ``path``, ready to run; ValueError naming the file when it is missing or is not a
    valid ExecuTorch program."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    return EdgeProgram(path)

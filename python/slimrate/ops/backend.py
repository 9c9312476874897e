"""The one backend picker for every op: explicit ``backend=`` > ``SLIMRATE_BACKEND`` > device default.

Backends:
- ``"native"``: the compiled extension ``slimrate._C`` (C++ on CPU tensors, CUDA on CUDA tensors);
- ``"triton"``: ``slimrate.triton_kernels.<op>_triton`` (CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported);
- ``"reference"``: ``slimrate.ops.reference.<op>``, plain PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from slimrate.ops import reference

BACKENDS = ("native", "triton", "reference")
BUILD_HINT = "build it with `make build` (or `pip install -e . --no-build-isolation`) in the slimrate checkout"


# Importing slimrate._C registers the torch.ops.slimrate kernels. A missing build is reported when a
# native op is called; a build that exists but fails to import raises here, loudly.
_EXTENSION = importlib.import_module("slimrate._C") if importlib.util.find_spec("slimrate._C") else None


def extension_available() -> bool:
    """True when the compiled extension slimrate._C is installed."""
    return _EXTENSION is not None


def load_extension():
    """The imported slimrate._C module, or ImportError saying how to build it."""
    if _EXTENSION is None:
        raise ImportError(f"slimrate's compiled extension slimrate._C is missing; {BUILD_HINT}")
    return _EXTENSION


def backend_name(backend: str | None) -> str:
    """Resolve ``backend`` (or SLIMRATE_BACKEND, or "native") and validate it."""
    name = backend if backend is not None else os.environ.get("SLIMRATE_BACKEND", "native")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} (or None for the default), got {name!r}")
    return name


def pick_backend(op: str, backend: str | None, device: torch.device) -> Callable:
    """Return the implementation of ``op`` (e.g. "rate_grad_") for tensors on ``device``."""
    name = backend_name(backend)
    if name == "native":
        extension = load_extension()
        if device.type == "cuda" and not extension.cuda_built:
            raise ImportError(f"slimrate._C was built without CUDA, so {op} cannot run on {device}; rebuild "
                              "where torch has CUDA and nvcc is on PATH (SLIMRATE_CUDA=1 makes that strict)")
        return getattr(torch.ops.slimrate, op)
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors, got {device}; on CPU set TRITON_INTERPRET=1 "
                             "before triton is imported")
        kernels = importlib.import_module("slimrate.triton_kernels")
        return getattr(kernels, op.rstrip("_") + "_triton")
    return getattr(reference, op)

"""libslimrate_edge.so: the ExecuTorch kernels of slimrate's ops (edge/kernels/), loaded into the ExecuTorch
runtime of this process (docs/edge.md §3)."""

from __future__ import annotations

import ctypes
import functools
import importlib
import warnings
from pathlib import Path

# `make edge` builds the library (edge/CMakeLists.txt) and copies it here.
KERNEL_LIBRARY = Path(__file__).with_name("libslimrate_edge.so")
BUILD_HINT = "build it with `make edge` in the slimrate checkout"


@functools.cache
def load_kernels() -> ctypes.CDLL:
    """Register slimrate's ExecuTorch kernels with the runtime behind ``executorch.runtime``; once per process.

    The runtime's Python extension is imported first: it loads libexecutorch.so, and our library, linked to the
    same libexecutorch.so, then registers its kernels in that runtime's operator registry as it loads (a second
    copy of the runtime would get them instead). ImportError with the build command when the library is missing.
    """
    with warnings.catch_warnings():  # the one warning of that import: its API may change (the pinned release's)
        warnings.filterwarnings("ignore", message="This API is experimental")
        importlib.import_module("executorch.extension.pybindings.portable_lib")
    if not KERNEL_LIBRARY.is_file():
        raise ImportError(f"slimrate's ExecuTorch kernels {KERNEL_LIBRARY} are missing; {BUILD_HINT}")
    return ctypes.CDLL(str(KERNEL_LIBRARY), mode=ctypes.RTLD_GLOBAL)

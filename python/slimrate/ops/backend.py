"""The op registry: every op's implementation per backend, and the one picker every op face calls.

The backend is explicit ``backend=`` > ``SLIMRATE_BACKEND`` > "native", the same rule for every op:
- "native": the compiled kernel ``torch.ops.slimrate.<op>`` (C++ on CPU tensors, CUDA on CUDA tensors); for the
  matrix exponentials, whose work is matrix products, slimrate's own algorithm on torch's GEMMs;
- "triton": the Triton launcher ``slimrate.triton_kernels.<op>_triton`` (through an ``autograd.Function`` where
  the op is differentiable): CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
  imported;
- "reference": ``slimrate.ops.reference.<op>``, plain PyTorch (score_entropy's through an adapter in ops/ctmc.py).

An implementation takes the op's arguments after the face's checks, in the order of its schema (csrc/ops.cpp),
and returns what the schema returns.  The native kernels check the data they index with in their compiled glue
(csrc/*_inputs.h); ``DATA_CHECKS`` makes the same checks in Python before every other backend, so a corrupt
index is refused on every backend, and the native path pays for it once.

``registered_ops()`` and ``available_backends(op)`` read the table; ``resolve_backend(op, backend)`` and
``pick_backend(op, backend, device)`` choose from it.  A new op is one REGISTRY row (plus a DATA_CHECKS row when
its glue checks data), its face in ops/<family>.py and its name in ``slimrate.ops.__all__``;
tests/test_backends.py then walks it on every backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("native", "triton", "reference")
BUILD_HINT = "build it with `make build` (or `pip install -e . --no-build-isolation`) in the slimrate checkout"

# Importing slimrate._C registers the torch.ops.slimrate kernels. A missing build is reported when a
# native op is called; a build that exists but fails to import raises here, loudly.
_EXTENSION = importlib.import_module("slimrate._C") if importlib.util.find_spec("slimrate._C") else None

# An implementation is "package.module:attribute", imported on first use (so triton is imported only when asked
# for), or "torch.ops.slimrate.<op>", a compiled kernel.
_NATIVE = "torch.ops.slimrate."
_TRITON = "slimrate.triton_kernels:"
_REFERENCE = "slimrate.ops.reference:"

REGISTRY: dict[str, dict[str, str]] = {
    # BackSlash rate proxy (ops/rate.py)
    "rate_stats": {"native": _NATIVE + "rate_stats", "triton": _TRITON + "rate_stats_triton",
                   "reference": _REFERENCE + "rate_stats"},
    "rate_grad_": {"native": _NATIVE + "rate_grad_", "triton": _TRITON + "rate_grad_triton",
                   "reference": _REFERENCE + "rate_grad_"},
    # entropy coders (ops/coding.py): bit-serial, so CPU only and no Triton kernel
    "eg_code_length": {"native": _NATIVE + "eg_code_length", "reference": _REFERENCE + "eg_code_length"},
    "eg_encode": {"native": _NATIVE + "eg_encode", "reference": _REFERENCE + "eg_encode"},
    "eg_decode": {"native": _NATIVE + "eg_decode", "reference": _REFERENCE + "eg_decode"},
    "rans_encode": {"native": _NATIVE + "rans_encode", "reference": _REFERENCE + "rans_encode"},
    "rans_decode": {"native": _NATIVE + "rans_decode", "reference": _REFERENCE + "rans_decode"},
    # a float tensor ↔ its .slim payload (ops/coding.py): quantization fused with the coders above, in chunks
    "slim_encode": {"native": _NATIVE + "slim_encode", "reference": _REFERENCE + "slim_encode"},
    "slim_decode": {"native": _NATIVE + "slim_decode", "reference": _REFERENCE + "slim_decode"},
    # block-sparse linear (ops/sparse.py)
    "sparse_linear": {"native": _NATIVE + "sparse_linear", "triton": _TRITON + "sparse_linear_triton",
                      "reference": _REFERENCE + "sparse_linear"},
    # NF4 / QLoRA (ops/nf4.py); nf4_absmax_dequantize decodes a nested QuantState for the other two faces
    "nf4_quantize": {"native": _NATIVE + "nf4_quantize", "triton": _TRITON + "nf4_quantize_triton",
                     "reference": _REFERENCE + "nf4_quantize"},
    "nf4_dequantize": {"native": _NATIVE + "nf4_dequantize", "triton": _TRITON + "nf4_dequantize_triton",
                       "reference": _REFERENCE + "nf4_dequantize"},
    "nf4_absmax_dequantize": {"native": _NATIVE + "nf4_absmax_dequantize",
                              "triton": _TRITON + "nf4_absmax_dequantize_triton",
                              "reference": _REFERENCE + "nf4_absmax_dequantize"},
    "nf4_lora_linear": {"native": _NATIVE + "nf4_lora_linear", "triton": "slimrate.ops.nf4:TritonLoRALinear.apply",
                        "reference": _REFERENCE + "nf4_lora_linear"},
    # CTMC / Discrete Markov Bridge (ops/ctmc.py)
    "ctmc_transition_rows": {"native": _NATIVE + "ctmc_transition_rows",
                             "triton": "slimrate.ops.ctmc:TritonTransitionRows.apply",
                             "reference": _REFERENCE + "ctmc_transition_rows"},
    "ctmc_rate_cols": {"native": _NATIVE + "ctmc_rate_cols", "triton": "slimrate.ops.ctmc:TritonRateCols.apply",
                       "reference": _REFERENCE + "ctmc_rate_cols"},
    "score_entropy": {"native": _NATIVE + "score_entropy", "triton": "slimrate.ops.ctmc:TritonScoreEntropy.apply",
                      "reference": "slimrate.ops.ctmc:reference_score_entropy"},
    # matrix exponentials (ops/expm.py): matrix products, so torch's GEMMs are the kernels and Triton adds nothing
    "expm": {"native": "slimrate.ops.expm:expm_pade", "reference": _REFERENCE + "expm"},
    "expm_multi_t": {"native": "slimrate.ops.expm:expm_multi_t_taylor", "reference": _REFERENCE + "expm_multi_t"},
}

# The data checks each native implementation makes itself (csrc/*_inputs.h; the Python of expm), run before the
# other backends on the same arguments.  Each costs one device-to-host synchronisation.
DATA_CHECKS: dict[str, str] = {
    "sparse_linear": "slimrate.ops.sparse_format:check_block_indices",
    "ctmc_transition_rows": "slimrate.ops.ctmc:check_rows_data",
    "ctmc_rate_cols": "slimrate.ops.ctmc:check_cols_data",
    "score_entropy": "slimrate.ops.ctmc:check_score_data",
    "slim_decode": "slimrate.ops.coding:check_slim_layout",
    "expm": "slimrate.ops.expm:check_finite",
    "expm_multi_t": "slimrate.ops.expm:check_finite",
}


def extension_available() -> bool:
    """True when the compiled extension slimrate._C is installed."""
    return _EXTENSION is not None


def load_extension():
    """The imported slimrate._C module, or ImportError saying how to build it."""
    if _EXTENSION is None:
        raise ImportError(f"slimrate's compiled extension slimrate._C is missing; {BUILD_HINT}")
    return _EXTENSION


def registered_ops() -> tuple[str, ...]:
    """The names of every op in the registry."""
    return tuple(REGISTRY)


def available_backends(op: str) -> tuple[str, ...]:
    """The backends ``op`` has, in the order of BACKENDS."""
    if op not in REGISTRY:
        raise ValueError(f"op: {op!r} is not a registered op; registered ops are {registered_ops()}")
    return tuple(name for name in BACKENDS if name in REGISTRY[op])


def resolve_backend(op: str, backend: str | None) -> str:
    """The backend ``op`` runs on: ``backend``, else SLIMRATE_BACKEND, else "native".

    ValueError for a name not in BACKENDS, and one ValueError naming the op, the backend and the backends it
    has when ``op`` lacks the one asked for.
    """
    name = backend if backend is not None else os.environ.get("SLIMRATE_BACKEND") or "native"
    if name in REGISTRY.get(op, ()):
        return name
    available = available_backends(op)  # ValueError for an unknown op
    source = "" if backend is not None else f" (from SLIMRATE_BACKEND={name})"
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} (or None for the default), got {name!r}{source}")
    raise ValueError(f"backend: {op} has no {name!r} backend{source}; it has {available}; pass backend= one of those")


def pick_backend(op: str, backend: str | None, device: torch.device) -> Callable:
    """The implementation of ``op`` (e.g. "rate_grad_") on the resolved backend, for tensors on ``device``.

    ImportError when a compiled kernel is asked for and slimrate._C is missing, or was built without CUDA and
    ``device`` is a GPU; ValueError for Triton on CPU tensors without TRITON_INTERPRET=1.
    """
    name = resolve_backend(op, backend)
    if REGISTRY[op][name].startswith(_NATIVE):
        extension = load_extension()
        if device.type == "cuda" and not extension.cuda_built:
            raise ImportError(f"slimrate._C was built without CUDA, so {op} cannot run on {device}; rebuild "
                              "where torch has CUDA and nvcc is on PATH (SLIMRATE_CUDA=1 makes that strict)")
    elif name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {device}; on CPU set TRITON_INTERPRET=1 "
                         "before triton is imported")
    return _implementation(op, name)


def _load(path: str) -> Callable:
    if path.startswith(_NATIVE):
        return getattr(torch.ops.slimrate, path.removeprefix(_NATIVE))
    module, _, attribute = path.partition(":")
    return functools.reduce(getattr, attribute.split("."), importlib.import_module(module))


_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}  # (op, backend) -> _implementation's result


def _implementation(op: str, name: str) -> Callable:
    """REGISTRY[op][name], after DATA_CHECKS[op] off the native backend; loaded once."""
    if (op, name) not in _IMPLEMENTATIONS:
        run = _load(REGISTRY[op][name])
        check = DATA_CHECKS.get(op) if name != "native" else None
        _IMPLEMENTATIONS[op, name] = run if check is None else _checked(_load(check), run)
    return _IMPLEMENTATIONS[op, name]


def _checked(check: Callable, run: Callable) -> Callable:
    def checked(*args):
        check(*args)
        return run(*args)

    return checked

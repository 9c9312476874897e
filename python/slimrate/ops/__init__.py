"""slimrate ops: one Python face per op — check the arguments (ops/checks.py), pick the backend through the one
registry (ops/backend.py), call it.

Every registry op takes ``backend=`` ("native", "triton", "reference"; default ``SLIMRATE_BACKEND``, else
"native"); ``available_backends(op)`` says which backends an op has, ``registered_ops()`` lists the registry (it
also holds ``nf4_absmax_dequantize``, which the NF4 faces call for a nested QuantState).  The other names here
take no backend: ``quantize``/``dequantize`` (a scalar quantizer), ``ctmc_lambda`` (Λ from rates) and
``rans_header_size`` (a header parser) are plain PyTorch/Python on any device, ``DEFAULT_CHUNK_NUMEL`` is
``slim_encode``'s default chunk; ``BACKENDS``,
``extension_available`` and the two functions above describe the registry.  ``ops`` imports no method package:
block-sparse storage (``SparseMatrix``, re-exported by ``slimrate.sparse``) lives in ops/sparse_format.py.
"""

from slimrate.ops.backend import BACKENDS, available_backends, extension_available, registered_ops
from slimrate.ops.coding import (
    DEFAULT_CHUNK_NUMEL,
    dequantize,
    eg_code_length,
    eg_decode,
    eg_encode,
    quantize,
    rans_decode,
    rans_encode,
    rans_header_size,
    slim_decode,
    slim_encode,
)
from slimrate.ops.ctmc import ctmc_lambda, ctmc_rate_cols, ctmc_transition_rows, score_entropy
from slimrate.ops.expm import expm, expm_multi_t
from slimrate.ops.nf4 import nf4_dequantize, nf4_lora_linear, nf4_quantize
from slimrate.ops.rate import rate_grad_, rate_stats
from slimrate.ops.sparse import sparse_linear

__all__ = ["BACKENDS", "available_backends", "extension_available", "registered_ops"]  # the registry
__all__ += ["DEFAULT_CHUNK_NUMEL"]  # slim_encode's default chunk
__all__ += ["dequantize", "eg_code_length", "eg_decode", "eg_encode", "quantize", "rans_decode", "rans_encode",
            "rans_header_size", "rate_grad_", "rate_stats", "slim_decode", "slim_encode", "sparse_linear"]
__all__ += ["ctmc_lambda", "ctmc_rate_cols", "ctmc_transition_rows", "expm", "expm_multi_t",  # CTMC / DMB
            "score_entropy"]
__all__ += ["nf4_dequantize", "nf4_lora_linear", "nf4_quantize"]  # NF4 / QLoRA

"""slimrate ops: one Python face per op (check → pick backend → call); see ops/backend.py."""

from slimrate.ops.backend import BACKENDS, extension_available
from slimrate.ops.coding import (
    dequantize,
    eg_code_length,
    eg_decode,
    eg_encode,
    quantize,
    rans_decode,
    rans_encode,
    rans_header_size,
)
from slimrate.ops.ctmc import ctmc_lambda, ctmc_rate_cols, ctmc_transition_rows, score_entropy
from slimrate.ops.expm import expm, expm_multi_t
from slimrate.ops.nf4 import nf4_dequantize, nf4_lora_linear, nf4_quantize
from slimrate.ops.rate import rate_grad_, rate_stats
from slimrate.ops.sparse import sparse_linear

__all__ = ["BACKENDS", "dequantize", "eg_code_length", "eg_decode", "eg_encode", "extension_available", "quantize",
           "rans_decode", "rans_encode", "rans_header_size", "rate_grad_", "rate_stats", "sparse_linear"]
__all__ += ["ctmc_lambda", "ctmc_rate_cols", "ctmc_transition_rows", "expm", "expm_multi_t",  # CTMC / DMB
            "score_entropy"]
__all__ += ["nf4_dequantize", "nf4_lora_linear", "nf4_quantize"]  # NF4 / QLoRA

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
from slimrate.ops.rate import rate_grad_, rate_stats
from slimrate.ops.sparse import sparse_linear

__all__ = ["BACKENDS", "dequantize", "eg_code_length", "eg_decode", "eg_encode", "extension_available", "quantize",
           "rans_decode", "rans_encode", "rans_header_size", "rate_grad_", "rate_stats", "sparse_linear"]

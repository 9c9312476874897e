"""Triton kernels, installed as slimrate.triton_kernels; each launcher is named <op>_triton."""

from slimrate.triton_kernels.ctmc import (
    ctmc_rate_cols_triton,
    ctmc_transition_rows_backward_triton,
    ctmc_transition_rows_triton,
    score_entropy_triton,
)
from slimrate.triton_kernels.nf4 import (
    nf4_absmax_dequantize_triton,
    nf4_dequantize_triton,
    nf4_linear_grad_input_triton,
    nf4_lora_linear_triton,
    nf4_quantize_triton,
)
from slimrate.triton_kernels.rate import rate_grad_triton, rate_stats_triton
from slimrate.triton_kernels.sparse import sparse_linear_triton

__all__ = ["rate_grad_triton", "rate_stats_triton", "sparse_linear_triton"]
__all__ += ["ctmc_rate_cols_triton", "ctmc_transition_rows_backward_triton", "ctmc_transition_rows_triton",
            "score_entropy_triton"]  # CTMC / DMB
__all__ += ["nf4_absmax_dequantize_triton", "nf4_dequantize_triton", "nf4_linear_grad_input_triton",
            "nf4_lora_linear_triton", "nf4_quantize_triton"]  # NF4 / QLoRA

// Every slimrate op schema, in one place (DESIGN.md "One op, end to end").
// Kernels register per device: csrc/cpu/*.cpp (CPU), csrc/cuda/*_glue.cpp (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(slimrate, m) {
  // (N, Σ|θ|, Σθ²) over all tensors, float64 [3]: the moments behind the BackSlash shape estimate.
  m.def("rate_stats(Tensor[] tensors) -> Tensor");
  // grads[i] += lam·∂R/∂params[i] for R = (1/N) Σ (|θ|+eps)^nu over all params; returns R (float64 []).
  m.def("rate_grad_(Tensor[] params, Tensor(a!)[] grads, float lam, float nu, float eps) -> Tensor");
  // Entropy coders (CPU only; csrc/cpu/entropy_cpu.cpp): int32 symbols (n,) <-> uint8 bytes.
  // Exact exp-Golomb code length in bits (int64 []) of symbols at order k (zig-zag mapped when signed);
  // a tensor, not an int, so the fake kernel needs no data-dependent Python int.
  m.def("eg_code_length(Tensor symbols, int k, bool signed) -> Tensor");
  // Exp-Golomb order k, MSB first, last byte zero-padded: ceil(eg_code_length / 8) bytes.
  m.def("eg_encode(Tensor symbols, int k, bool signed) -> Tensor");
  m.def("eg_decode(Tensor buf, int count, int k, bool signed) -> Tensor");
  // Static rANS: header (alphabet, 2^16-scale frequencies) + 32-bit-state byte-wise stream.
  m.def("rans_encode(Tensor symbols) -> Tensor");
  m.def("rans_decode(Tensor buf, int count) -> Tensor");
  // Block-sparse linear layer (csrc/cpu/sparse_cpu.cpp, csrc/cuda/sparse_cuda.cu): y = x·Wᵀ + bias,
  // x [B, in] float32/bfloat16/float16 -> y [B, out] in x's dtype, float32 accumulation. W [out, in] is
  // block-CSR with blocks (r, c) = values.shape[1:]: values [nblocks, r, c] float32/bfloat16/float16,
  // col_idx [nblocks] int32 in [0, ceil(in/c)), row_ptr [ceil(out/r)+1] int64 from 0 to nblocks,
  // nondecreasing; x is read as zero past column in. bias: [out] or None.
  m.def("sparse_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, int out_features, "
        "Tensor? bias) -> Tensor");
  // quantize / dequantize: plain PyTorch in python/slimrate/ops/coding.py (no kernel needed).
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef SLIMRATE_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}

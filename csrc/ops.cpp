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
  // A float tensor's symbols q = round(x/step) (float64 division, ties to even), flattened in C order and coded in
  // chunks of chunk_numel (csrc/cpu/slim_codec_cpu.cpp; docs/slim-format.md): x float16/bfloat16/float32/float64,
  // any shape; coder "eg" | "eg-signed" | "rans" -> (payload uint8 [nbytes] = [eg table][chunk 0][chunk 1]...,
  // layout int64 [2 + ceil(numel / chunk_numel)] = [table_count, table_nbytes, chunk_nbytes...]).
  m.def("slim_encode(Tensor x, float step, str coder, int chunk_numel) -> (Tensor, Tensor)");
  // Its inverse: x̂ [numel] of dtype = q·step in float64 rounded once to dtype (as ops.dequantize).
  m.def("slim_decode(Tensor payload, Tensor layout, int numel, float step, str coder, int chunk_numel, "
        "ScalarType dtype) -> Tensor");
  // Block-sparse linear layer (csrc/cpu/sparse_cpu.cpp, csrc/cuda/sparse_cuda.cu): y = x·Wᵀ + bias,
  // x [B, in] float32/bfloat16/float16 -> y [B, out] in x's dtype, float32 accumulation. W [out, in] is
  // block-CSR with blocks (r, c) = values.shape[1:]: values [nblocks, r, c] float32/bfloat16/float16,
  // col_idx [nblocks] int32 (or, CPU, int16 holding uint16 bits) in [0, ceil(in/c)), row_ptr [ceil(out/r)+1]
  // int64 from 0 to nblocks, nondecreasing; x is read as zero past column in. bias: [out] or None.
  m.def("sparse_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, int out_features, "
        "Tensor? bias) -> Tensor");
  // The same product written into out (resized to [B, out], x's dtype; CPU only): the out variant ExecuTorch's
  // memory planning turns the functional op into (docs/edge.md §2; its ExecuTorch kernel is edge/kernels/).
  m.def("sparse_linear.out(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, int out_features, "
        "Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)");
  // quantize / dequantize: plain PyTorch in python/slimrate/ops/coding.py (no kernel needed).
  // NF4 4-bit weights, bitsandbytes' layout (csrc/kernels/nf4.h; csrc/cpu/nf4_cpu.cpp, csrc/cuda/nf4_cuda.cu):
  // W flattened into n weights, two per uint8 byte (even index in the high nibble), one float32 absmax per
  // block of `blocksize` (even) weights.  w: float32/bfloat16/float16, any shape -> packed [(n+1)/2, 1] uint8,
  // absmax [ceil(n/blocksize)] float32, the bytes of bitsandbytes' quantize_4bit(quant_type="nf4").
  m.def("nf4_quantize(Tensor w, int blocksize) -> (Tensor, Tensor)");
  // W [shape] in dtype (float32/bfloat16/float16) = code[nibble]·absmax in float32, then rounded.
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int[] shape, int blocksize, ScalarType dtype) -> Tensor");
  // y = x·Wᵀ + scaling·(lora_x·lora_Aᵀ)·lora_Bᵀ + bias, W [out_features, in] NF4: x, lora_x [M, in]
  // float32/bfloat16/float16 (lora_x None = x), lora_A [r, in], lora_B [out, r], bias [out] or None, any
  // float dtypes -> y [M, out] in x's dtype, float32 accumulation. Autograd in python/slimrate/ops/nf4.py.
  m.def("nf4_lora_linear(Tensor x, Tensor packed, Tensor absmax, int out_features, int blocksize, Tensor? lora_x, "
        "Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias) -> Tensor");
  // Its input gradient: dx = grad_y·W + lora_grad_h·lora_A, grad_y [M, out], lora_grad_h [M, r] (= scaling·
  // grad_y·lora_B, or both None) -> dx [M, in_features] in grad_y's dtype, float32 accumulation.
  m.def("nf4_linear_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, int in_features, int blocksize, "
        "Tensor? lora_grad_h, Tensor? lora_A) -> Tensor");
  // Double-quantized absmax (bitsandbytes' compress_statistics): absmax[i] = code[qabsmax[i]]·absmax2[i / blocksize]
  // + offset, a float32 product then a float32 sum (bitsandbytes' order); qabsmax uint8 [nb], code float32 [256],
  // absmax2 float32 [ceil(nb / blocksize)], offset float32 [] -> float32 [nb].  The quantization side (once per
  // weight) is plain PyTorch in python/slimrate/ops/nf4.py.
  m.def("nf4_absmax_dequantize(Tensor qabsmax, Tensor code, Tensor absmax2, Tensor offset, int blocksize) -> Tensor");

  // ---- CTMC / Discrete Markov Bridge (docs/dmb.md §4; csrc/kernels/ctmc.h, csrc/cpu/ctmc_cpu.cpp,
  // csrc/cuda/ctmc_cuda.cu; python/slimrate/ops/ctmc.py).  DMB's structured rate matrix per position l:
  // lam [L, V] float32/float64 = Λ in rank order (non-decreasing, last entry 0), perm / perm_inv [L, V] int64 =
  // rank of each state / state at each rank.  Token ids [B, L] int64; h, sigma [B] in lam's dtype.
  // Rows x0 of exp(h·Q) -> [B, L, V] in lam's dtype (closed form, no V×V matrix).
  m.def("ctmc_transition_rows(Tensor x0, Tensor h, Tensor lam, Tensor perm, Tensor perm_inv) -> Tensor");
  // Its backward: grad [B, L, V] -> (dlam [L, V], dh [B]).  Autograd in python/slimrate/ops/ctmc.py.
  m.def("ctmc_transition_rows_backward(Tensor grad, Tensor x0, Tensor h, Tensor lam, Tensor perm, "
        "Tensor perm_inv) -> (Tensor, Tensor)");
  // Column x of Q (the rates into x) -> [B, L, V] in lam's dtype.
  m.def("ctmc_rate_cols(Tensor x, Tensor lam, Tensor perm, Tensor perm_inv) -> Tensor");
  // Denoising score entropy per sequence (docs/dmb.md §4) -> (loss [B], d loss[b] / d logscore [B, L, V] when
  // with_grad, else [0]); logscore [B, L, V] in lam's dtype.  The gradient comes from the same pass.
  m.def("score_entropy(Tensor logscore, Tensor x_t, Tensor x0, Tensor h, Tensor sigma, Tensor lam, Tensor perm, "
        "Tensor perm_inv, bool with_grad) -> (Tensor, Tensor)");
  // Its backward in (lam, h, sigma) for the loss gradient [B] -> (dlam [L, V], dh [B], dsigma [B]): a composite of
  // the kernels above, torch.library.custom_op("slimrate::score_entropy_rate_backward") in
  // python/slimrate/ops/ctmc.py, called by csrc/cpu/ctmc_autograd.cpp.
  // expm (scaling and squaring, Padé) and expm_multi_t (shared Taylor powers): plain PyTorch in
  // python/slimrate/ops/expm.py (matmul-bound: torch's GEMMs are the kernels).
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef SLIMRATE_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}

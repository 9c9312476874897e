// Torch-free CUDA launchers of the NF4 ops (schemas in csrc/ops.cpp, ATen glue in nf4_cuda_glue.cpp, layout in
// csrc/kernels/nf4.h).  The fused linear layer runs like the CPU's (csrc/cpu/nf4_cpu.cpp, csrc/nf4_inputs.h):
// few tokens in one pass over the packed weights, many tokens as panels decoded into a buffer for cuBLAS.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace slimrate {

// Element formats of activations and buffers (kernels/portable.h): float32, bfloat16, float16.
enum class NF4Kind { F32, BF16, F16 };

// Packed W (n weights, (n + 1) / 2 bytes) and its float32 absmax per block of `blocksize` (even) weights.
struct NF4Weights {
  const uint8_t* packed;
  const float* absmax;
  int64_t blocksize;
};

// Up to this many tokens the fused kernels run (one accumulator per token and thread).
constexpr int64_t kNF4CudaFusedTokens = 8;

// w [n] in `kind` -> packed [(n + 1) / 2], absmax [ceil(n / blocksize)]: bitsandbytes' bytes.
cudaError_t nf4_quantize_cuda_launch(NF4Kind kind, const void* w, int64_t n, int64_t blocksize, uint8_t* packed,
                                     float* absmax, cudaStream_t stream);

// out [n] in `kind` = code[nibble]·absmax in float32, rounded.
cudaError_t nf4_dequantize_cuda_launch(NF4Kind kind, const NF4Weights& w, int64_t n, void* out, cudaStream_t stream);

// absmax [nb] float32 = code[qabsmax]·absmax2[i / blocksize] + offset[0] (float32 product, then the sum).
cudaError_t nf4_absmax_dequantize_cuda_launch(const uint8_t* qabsmax, const float* code, const float* absmax2,
                                              const float* offset, int64_t nb, int64_t blocksize, float* absmax,
                                              cudaStream_t stream);

// Few tokens: y [M, out] float32 = xa [M, ka] · [W | E]ᵀ with E [out, ecols] float32 the columns past in
// (ka = in + ecols); M <= kNF4CudaFusedTokens.
cudaError_t nf4_forward_fused_cuda_launch(const NF4Weights& w, int64_t in, int64_t out, const float* xa, int64_t M,
                                          int64_t ka, const float* e, int64_t ecols, float* y, cudaStream_t stream);

// Few tokens: partial [chunks, M, in] float32, chunk c = Σ over rows [c·rows_per_chunk, …) of ga · [W ; A], with
// gat = gaᵀ [rows, M] float32 and A [rows − out, in] float32; the caller sums the chunks.
cudaError_t nf4_backward_fused_cuda_launch(const NF4Weights& w, int64_t in, int64_t out, const float* gat, int64_t M,
                                           int64_t rows, const float* a, int64_t rows_per_chunk, int64_t chunks,
                                           float* partial, cudaStream_t stream);

// Panels in `kind`: rows [o0, o0 + rows) of [W | E] into buf [rows, ka] (contiguous) ...
cudaError_t nf4_fill_forward_panel_cuda_launch(NF4Kind kind, const NF4Weights& w, int64_t in, const float* e,
                                               int64_t ecols, int64_t o0, int64_t rows, int64_t ka, void* buf,
                                               cudaStream_t stream);
// ... and columns [c0, c0 + cols) of every row of [W ; A] (rows = out + r) into buf [rows, cols], row stride ld.
cudaError_t nf4_fill_backward_panel_cuda_launch(NF4Kind kind, const NF4Weights& w, int64_t in, int64_t out,
                                                const float* a, int64_t rows, int64_t c0, int64_t cols, int64_t ld,
                                                void* buf, cudaStream_t stream);

}  // namespace slimrate

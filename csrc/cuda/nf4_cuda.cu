// CUDA kernels of the NF4 ops, torch-free (launchers declared in nf4_cuda.h).  Not yet run on a GPU: compiled
// for sm_90 by tests/test_cuda_compile.py; bench/gpu_check.sh runs the tests and benchmarks where one is lent.
// - quantize: one thread block per quantization block (absmax by a block reduction), bitsandbytes' arithmetic
//   with IEEE divisions (__fdiv_rn), code index by the branch-free midpoint count of kernels/nf4.h;
// - dequantize: one thread per packed byte;
// - fused forward (few tokens): one warp per output row, lanes stride over the row (consecutive bytes), one
//   float32 accumulator per token, warp-shuffle sum;
// - fused backward (few tokens): one thread per input column and chunk of rows, coalesced row reads, partial
//   sums per chunk (summed by the glue: deterministic, no atomics);
// - panel fills for the many-token schedule: one thread per element, stored in the GEMM's dtype.
#include <cuda_runtime.h>

#include "cuda/nf4_cuda.h"
#include "kernels/nf4.h"
#include "kernels/portable.h"

namespace slimrate {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;

__constant__ float c_nf4_code[16] = SLIMRATE_NF4_CODE;

__device__ __forceinline__ float nf4_weight(const NF4Weights& w, int64_t i) {
  return c_nf4_code[nf4_nibble(w.packed, i)] * w.absmax[i / w.blocksize];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <class Fmt>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const typename Fmt::storage* w, int64_t n, int64_t bs,
                                                            uint8_t* packed, float* absmax) {
  __shared__ float warp_max_[kWarps];
  const int64_t b = blockIdx.x, start = b * bs, len = min(bs, n - start);
  float am = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) am = fmaxf(am, fabsf(Fmt::load(w[start + i])));
  am = warp_max(am);
  if (threadIdx.x % 32 == 0) warp_max_[threadIdx.x / 32] = am;
  __syncthreads();
  am = 0.0f;
  for (int i = 0; i < kWarps; ++i) am = fmaxf(am, warp_max_[i]);
  if (threadIdx.x == 0) absmax[b] = am;
  const float div = fmaxf(am, kNF4AbsmaxFloor);
  const float inv = __fdiv_rn(1.0f, div);
  const bool full = len == bs;  // a full block multiplies by the reciprocal, the last partial one divides
  for (int64_t j = threadIdx.x; 2 * j < len; j += kThreads) {
    const float v0 = Fmt::load(w[start + 2 * j]);
    const uint32_t h = nf4_index(nf4_clamp(full ? __fmul_rn(v0, inv) : __fdiv_rn(v0, div)));
    uint32_t l = kNF4PadIndex;
    if (2 * j + 1 < len) {
      const float v1 = Fmt::load(w[start + 2 * j + 1]);
      l = nf4_index(nf4_clamp(full ? __fmul_rn(v1, inv) : __fdiv_rn(v1, div)));
    }
    packed[start / 2 + j] = static_cast<uint8_t>((h << 4) | l);
  }
}

template <class Fmt>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(NF4Weights w, int64_t n, typename Fmt::storage* out) {
  const int64_t j = int64_t{blockIdx.x} * kThreads + threadIdx.x;  // byte j: weights 2j, 2j + 1
  if (2 * j >= n) return;
  out[2 * j] = Fmt::store(nf4_weight(w, 2 * j));
  if (2 * j + 1 < n) out[2 * j + 1] = Fmt::store(nf4_weight(w, 2 * j + 1));
}

// __fmul_rn / __fadd_rn: no FMA contraction, the roundings of bitsandbytes' two passes.
__global__ void __launch_bounds__(kThreads) absmax_dequantize_kernel(const uint8_t* q, const float* code,
                                                                     const float* absmax2, const float* offset,
                                                                     int64_t nb, int64_t bs, float* absmax) {
  const int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (i < nb) absmax[i] = __fadd_rn(__fmul_rn(code[q[i]], absmax2[i / bs]), offset[0]);
}

template <int MT>
__global__ void __launch_bounds__(kThreads) forward_fused_kernel(NF4Weights w, int64_t in, int64_t out, const float* xa,
                                                                 int64_t ka, const float* e, int64_t ecols, float* y) {
  const int lane = threadIdx.x % 32;
  const int64_t o = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (o >= out) return;  // whole warps leave together: the shuffles below see all 32 lanes
  float acc[MT] = {};
  for (int64_t k = lane; k < ka; k += 32) {
    const float v = k < in ? nf4_weight(w, o * in + k) : e[o * ecols + (k - in)];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] += v * xa[m * ka + k];
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == 0) y[m * out + o] = s;
  }
}

template <int MT>
__global__ void __launch_bounds__(kThreads) backward_fused_kernel(NF4Weights w, int64_t in, int64_t out, const float* gat,
                                                                  int64_t rows, const float* a, int64_t per,
                                                                  float* partial) {
  const int64_t k = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (k >= in) return;
  const int64_t c = blockIdx.y, r0 = c * per, r1 = min(rows, r0 + per);
  float acc[MT] = {};
  for (int64_t o = r0; o < r1; ++o) {
    const float v = o < out ? nf4_weight(w, o * in + k) : a[(o - out) * in + k];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] += gat[o * MT + m] * v;
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) partial[(c * MT + m) * in + k] = acc[m];
}

template <class Fmt>
__global__ void __launch_bounds__(kThreads) fill_forward_kernel(NF4Weights w, int64_t in, const float* e, int64_t ecols,
                                                                int64_t o0, int64_t rows, int64_t ka,
                                                                typename Fmt::storage* buf) {
  const int64_t t = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (t >= rows * ka) return;
  const int64_t i = t / ka, k = t % ka, o = o0 + i;
  buf[t] = Fmt::store(k < in ? nf4_weight(w, o * in + k) : e[o * ecols + (k - in)]);
}

template <class Fmt>
__global__ void __launch_bounds__(kThreads) fill_backward_kernel(NF4Weights w, int64_t in, int64_t out, const float* a,
                                                                 int64_t rows, int64_t c0, int64_t cols, int64_t ld,
                                                                 typename Fmt::storage* buf) {
  const int64_t t = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (t >= rows * cols) return;
  const int64_t o = t / cols, k = c0 + t % cols;
  buf[o * ld + (k - c0)] = Fmt::store(o < out ? nf4_weight(w, o * in + k) : a[(o - out) * in + k]);
}

template <class F>
cudaError_t dispatch(NF4Kind kind, F&& f) {
  switch (kind) {
    case NF4Kind::F32: f(F32{}); break;
    case NF4Kind::BF16: f(BF16{}); break;
    default: f(F16{}); break;
  }
  return cudaGetLastError();
}

template <template <int> class Kernel, class... Args>
cudaError_t launch_tokens(int64_t M, dim3 grid, cudaStream_t stream, Args... args) {
  switch (M) {
#define SLIMRATE_TOKENS(MT) \
  case MT: Kernel<MT>::launch(grid, stream, args...); break;
    SLIMRATE_TOKENS(1)
    SLIMRATE_TOKENS(2)
    SLIMRATE_TOKENS(3)
    SLIMRATE_TOKENS(4)
    SLIMRATE_TOKENS(5)
    SLIMRATE_TOKENS(6)
    SLIMRATE_TOKENS(7)
    SLIMRATE_TOKENS(8)
#undef SLIMRATE_TOKENS
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <int MT>
struct ForwardFused {
  template <class... Args>
  static void launch(dim3 grid, cudaStream_t stream, Args... args) {
    forward_fused_kernel<MT><<<grid, kThreads, 0, stream>>>(args...);
  }
};

template <int MT>
struct BackwardFused {
  template <class... Args>
  static void launch(dim3 grid, cudaStream_t stream, Args... args) {
    backward_fused_kernel<MT><<<grid, kThreads, 0, stream>>>(args...);
  }
};

unsigned blocks_for(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t nf4_quantize_cuda_launch(NF4Kind kind, const void* w, int64_t n, int64_t blocksize, uint8_t* packed,
                                     float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  if (nblocks == 0) return cudaSuccess;
  if (nblocks > kMaxGrid) return cudaErrorInvalidValue;
  return dispatch(kind, [&](auto fmt) {
    using Fmt = decltype(fmt);
    quantize_kernel<Fmt><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
        static_cast<const typename Fmt::storage*>(w), n, blocksize, packed, absmax);
  });
}

cudaError_t nf4_dequantize_cuda_launch(NF4Kind kind, const NF4Weights& w, int64_t n, void* out, cudaStream_t stream) {
  const int64_t bytes = (n + 1) / 2;
  if (bytes == 0) return cudaSuccess;
  if (bytes / kThreads >= kMaxGrid) return cudaErrorInvalidValue;
  return dispatch(kind, [&](auto fmt) {
    using Fmt = decltype(fmt);
    dequantize_kernel<Fmt><<<blocks_for(bytes), kThreads, 0, stream>>>(w, n, static_cast<typename Fmt::storage*>(out));
  });
}

cudaError_t nf4_absmax_dequantize_cuda_launch(const uint8_t* qabsmax, const float* code, const float* absmax2,
                                              const float* offset, int64_t nb, int64_t blocksize, float* absmax,
                                              cudaStream_t stream) {
  if (nb == 0) return cudaSuccess;
  if (nb / kThreads >= kMaxGrid) return cudaErrorInvalidValue;
  absmax_dequantize_kernel<<<blocks_for(nb), kThreads, 0, stream>>>(qabsmax, code, absmax2, offset, nb, blocksize,
                                                                     absmax);
  return cudaGetLastError();
}

cudaError_t nf4_forward_fused_cuda_launch(const NF4Weights& w, int64_t in, int64_t out, const float* xa, int64_t M,
                                          int64_t ka, const float* e, int64_t ecols, float* y, cudaStream_t stream) {
  if (out == 0 || M == 0) return cudaSuccess;
  const int64_t blocks = (out + kWarps - 1) / kWarps;
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  return launch_tokens<ForwardFused>(M, dim3(static_cast<unsigned>(blocks)), stream, w, in, out, xa, ka, e, ecols, y);
}

cudaError_t nf4_backward_fused_cuda_launch(const NF4Weights& w, int64_t in, int64_t out, const float* gat, int64_t M,
                                           int64_t rows, const float* a, int64_t rows_per_chunk, int64_t chunks,
                                           float* partial, cudaStream_t stream) {
  if (in == 0 || M == 0 || chunks == 0) return cudaSuccess;
  if (chunks > 65535 || in / kThreads >= kMaxGrid) return cudaErrorInvalidValue;
  return launch_tokens<BackwardFused>(M, dim3(blocks_for(in), static_cast<unsigned>(chunks)), stream, w, in, out, gat,
                                      rows, a, rows_per_chunk, partial);
}

cudaError_t nf4_fill_forward_panel_cuda_launch(NF4Kind kind, const NF4Weights& w, int64_t in, const float* e,
                                               int64_t ecols, int64_t o0, int64_t rows, int64_t ka, void* buf,
                                               cudaStream_t stream) {
  if (rows * ka == 0) return cudaSuccess;
  if (rows * ka / kThreads >= kMaxGrid) return cudaErrorInvalidValue;
  return dispatch(kind, [&](auto fmt) {
    using Fmt = decltype(fmt);
    fill_forward_kernel<Fmt><<<blocks_for(rows * ka), kThreads, 0, stream>>>(
        w, in, e, ecols, o0, rows, ka, static_cast<typename Fmt::storage*>(buf));
  });
}

cudaError_t nf4_fill_backward_panel_cuda_launch(NF4Kind kind, const NF4Weights& w, int64_t in, int64_t out,
                                                const float* a, int64_t rows, int64_t c0, int64_t cols, int64_t ld,
                                                void* buf, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  if (rows * cols / kThreads >= kMaxGrid) return cudaErrorInvalidValue;
  return dispatch(kind, [&](auto fmt) {
    using Fmt = decltype(fmt);
    fill_backward_kernel<Fmt><<<blocks_for(rows * cols), kThreads, 0, stream>>>(
        w, in, out, a, rows, c0, cols, ld, static_cast<typename Fmt::storage*>(buf));
  });
}

}  // namespace slimrate

// CUDA kernels of the CTMC ops, torch-free (launchers declared in ctmc_cuda.h; closed forms in kernels/ctmc.h).
// - rows and columns: one thread per output entry (grid-stride), so writes are coalesced for any V;
// - transition-row backward: one block per position, its threads over ranks j (each owns dlam[l, j], so no
//   atomics: deterministic), looping over the batch with a block reduction per row for dh;
// - score entropy: one warp per (b, l) row, lanes over the V states, a warp reduction for the row's loss.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "cuda/ctmc_cuda.h"
#include "kernels/ctmc.h"

namespace slimrate {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// libdevice exp/expm1/log in float32 or float64 (the Math of kernels/ctmc.h).
template <class T>
struct CudaMath;
template <>
struct CudaMath<float> {
  using real = float;
  SLIMRATE_HD static float exp(float x) { return ::expf(x); }
  SLIMRATE_HD static float expm1(float x) { return ::expm1f(x); }
  SLIMRATE_HD static float log(float x) { return ::logf(x); }
};
template <>
struct CudaMath<double> {
  using real = double;
  SLIMRATE_HD static double exp(double x) { return ::exp(x); }
  SLIMRATE_HD static double expm1(double x) { return ::expm1(x); }
  SLIMRATE_HD static double log(double x) { return ::log(x); }
};

int grid_for(int64_t n) {
  // Grid-stride loops: at most 64 Ki blocks, enough to fill any GPU.
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16));
}

// Λ_j and a_{j−1} = Λ_j − Λ_{j−1} (0 at j = 0) of rank j in position row `base`.
template <class T>
__device__ void rank_lam_rate(const T* lam, int64_t base, int64_t j, T& lam_j, T& rate_j) {
  lam_j = lam[base + j];
  rate_j = j > 0 ? lam_j - lam[base + j - 1] : T(0);
}

template <class T>
__global__ void transition_rows_kernel(CtmcDeviceArgs<T> a, const int64_t* x0, const T* h, T* out) {
  const int64_t n = a.B * a.L * a.V;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < n; idx += int64_t{gridDim.x} * kThreads) {
    const int64_t row = idx / a.V, y = idx - row * a.V, base = (row % a.L) * a.V;
    const int64_t k0 = a.perm[base + x0[row]], j = a.perm[base + y];
    T lam_j, rate_j;
    rank_lam_rate(a.lam, base, j, lam_j, rate_j);
    out[idx] = transition_prob<CudaMath<T>>(h[row / a.L], lam_j, rate_j, j, k0);
  }
}

template <class T>
__global__ void rate_cols_kernel(CtmcDeviceArgs<T> a, const int64_t* x, T* out) {
  const int64_t n = a.B * a.L * a.V;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < n; idx += int64_t{gridDim.x} * kThreads) {
    const int64_t row = idx / a.V, y = idx - row * a.V, base = (row % a.L) * a.V;
    const int64_t k = a.perm[base + x[row]];
    T lam_k, rate_k;
    rank_lam_rate(a.lam, base, k, lam_k, rate_k);
    out[idx] = rate_into(a.perm[base + y], k, rate_k, lam_k);
  }
}

template <class T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// Sum over the block; every thread gets the total.  `shared` holds kWarps values.
template <class T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) total += shared[w];
  __syncthreads();  // shared is reused by the next call
  return total;
}

template <class T>
__global__ void transition_backward_kernel(CtmcDeviceArgs<T> a, const T* grad, const int64_t* x0, const T* h,
                                           T* dlam, T* dh_part) {
  __shared__ T shared[kWarps];
  const int64_t l = blockIdx.x, base = l * a.V;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t row = b * a.L + l;
    const int64_t k0 = a.perm[base + x0[row]];
    const T hb = h[b];
    const T* g = grad + row * a.V;
    T dh = 0;
    for (int64_t j = threadIdx.x; j < a.V; j += kThreads) {
      const T g_next = j + 1 < a.V ? g[a.perm_inv[base + j + 1]] : T(0);
      const T lam_j = a.lam[base + j];
      const T c = transition_backward_coef<CudaMath<T>>(hb, lam_j, g[a.perm_inv[base + j]], g_next, j, k0);
      dlam[base + j] += hb * c;  // this thread owns rank j of position l
      dh += lam_j * c;
    }
    dh = block_sum(dh, shared);
    if (threadIdx.x == 0) dh_part[row] = dh;
  }
}

template <class T>
__global__ void score_entropy_kernel(CtmcDeviceArgs<T> a, const T* logscore, const int64_t* x_t, const int64_t* x0,
                                     const T* h, const T* sigma, T* loss_row, T* grad) {
  using Math = CudaMath<T>;
  const T kNegInf = -static_cast<T>(INFINITY);  // std::numeric_limits is host-only without --expt-relaxed-constexpr
  const int lane = threadIdx.x % 32;
  const int64_t n_rows = a.B * a.L;
  const int64_t first = (blockIdx.x * int64_t{kThreads} + threadIdx.x) / 32;
  for (int64_t row = first; row < n_rows; row += int64_t{gridDim.x} * kWarps) {
    const int64_t b = row / a.L, base = (row % a.L) * a.V;
    const int64_t k = a.perm[base + x_t[row]], k0 = a.perm[base + x0[row]];
    T lam_k, rate_k;
    rank_lam_rate(a.lam, base, k, lam_k, rate_k);
    const T hb = h[b], w = sigma[b] * rate_k;
    const T logp_k = log_transition_prob<Math>(hb, lam_k, rate_k, k, k0, kNegInf);
    const bool live = w != T(0) && k > 0 && k >= k0 && logp_k != kNegInf;
    const T* s = logscore + row * a.V;
    T sum = 0;
    for (int64_t y = lane; y < a.V; y += 32) {
      const int64_t j = a.perm[base + y];
      T lam_j, rate_j;
      rank_lam_rate(a.lam, base, j, lam_j, rate_j);
      ScoreTerm<T> t = live ? score_entropy_term<Math>(s[y], hb, lam_j, rate_j, j, k0, k, logp_k) : ScoreTerm<T>{0, 0};
      sum += t.loss;
      if (grad != nullptr) grad[row * a.V + y] = w * t.grad;
    }
    sum = warp_sum(sum);
    if (lane == 0) loss_row[row] = w * sum;
  }
}

}  // namespace

template <class T>
cudaError_t ctmc_transition_rows_cuda_launch(const CtmcDeviceArgs<T>& a, const int64_t* x0, const T* h, T* out,
                                             cudaStream_t stream) {
  const int64_t n = a.B * a.L * a.V;
  if (n == 0) return cudaSuccess;
  transition_rows_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(a, x0, h, out);
  return cudaGetLastError();
}

template <class T>
cudaError_t ctmc_transition_rows_backward_cuda_launch(const CtmcDeviceArgs<T>& a, const T* grad, const int64_t* x0,
                                                      const T* h, T* dlam, T* dh_part, cudaStream_t stream) {
  if (a.B * a.L == 0) return cudaSuccess;
  // One block per position: L ≤ 2^31 − 1 blocks in x.
  transition_backward_kernel<T><<<static_cast<unsigned>(a.L), kThreads, 0, stream>>>(a, grad, x0, h, dlam, dh_part);
  return cudaGetLastError();
}

template <class T>
cudaError_t ctmc_rate_cols_cuda_launch(const CtmcDeviceArgs<T>& a, const int64_t* x, T* out, cudaStream_t stream) {
  const int64_t n = a.B * a.L * a.V;
  if (n == 0) return cudaSuccess;
  rate_cols_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(a, x, out);
  return cudaGetLastError();
}

template <class T>
cudaError_t score_entropy_cuda_launch(const CtmcDeviceArgs<T>& a, const T* logscore, const int64_t* x_t,
                                      const int64_t* x0, const T* h, const T* sigma, T* loss_row, T* grad,
                                      cudaStream_t stream) {
  const int64_t rows = a.B * a.L;
  if (rows == 0) return cudaSuccess;
  score_entropy_kernel<T><<<grid_for(rows * 32), kThreads, 0, stream>>>(a, logscore, x_t, x0, h, sigma, loss_row,
                                                                        grad);
  return cudaGetLastError();
}

#define SLIMRATE_CTMC_INSTANTIATE(T)                                                                                 \
  template cudaError_t ctmc_transition_rows_cuda_launch<T>(const CtmcDeviceArgs<T>&, const int64_t*, const T*, T*, \
                                                           cudaStream_t);                                          \
  template cudaError_t ctmc_transition_rows_backward_cuda_launch<T>(const CtmcDeviceArgs<T>&, const T*,            \
                                                                    const int64_t*, const T*, T*, T*, cudaStream_t); \
  template cudaError_t ctmc_rate_cols_cuda_launch<T>(const CtmcDeviceArgs<T>&, const int64_t*, T*, cudaStream_t);   \
  template cudaError_t score_entropy_cuda_launch<T>(const CtmcDeviceArgs<T>&, const T*, const int64_t*,              \
                                                    const int64_t*, const T*, const T*, T*, T*, cudaStream_t);
SLIMRATE_CTMC_INSTANTIATE(float)
SLIMRATE_CTMC_INSTANTIATE(double)

}  // namespace slimrate

// CUDA kernels of sparse_linear, torch-free (launcher declared in sparse_cuda.h): y = x·Wᵀ + bias with W
// block-CSR, float32 accumulation. One warp per block row, two ways of sharing its work:
// - batch ≤ kSmallBatch (SpMV and small batches): the lanes split the row's blocks, each lane takes whole
//   blocks and every batch entry, then the warp sums its lanes (the CSR "vector" kernel of Bell & Garland,
//   "Implementing sparse matrix-vector multiplication on throughput-oriented processors", SC 2009);
//   for CSR and 1×c blocks the lanes read consecutive values and column indices;
// - larger batches: the lanes split a tile of 32 batch entries and walk the row's blocks together, so each
//   weight is one broadcast load and each x read is a coalesced 128-byte row of xt (x transposed).
// Block rows of more than kRowsPerPass rows are done in passes of kRowsPerPass rows, so the accumulators
// stay in registers for any r. Block shapes (1, 1) and (1, c) are compiled with r (and c) fixed; others
// take r, c at run time. Not yet tuned on a GPU: kSmallBatch and the shapes fixed at compile time are
// first guesses to be set by bench/bench_sparse.py on a lent GPU.
#include <cuda_runtime.h>

#include "cuda/sparse_cuda.h"
#include "kernels/portable.h"

namespace slimrate {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerPass = 16;  // register accumulators per batch entry and lane
constexpr int kSmallBatch = 4;    // up to here the lanes split blocks; beyond, batch entries
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block column of block j, clamped into [0, bcols): the glue has checked col_idx, this keeps a kernel
// called on unchecked indices inside xt.
__device__ __forceinline__ int64_t block_col(const SparseLinearArgs& a, int64_t j) {
  uint32_t col = static_cast<uint32_t>(a.col_idx[j]);
  uint32_t last = static_cast<uint32_t>(a.bcols - 1);
  return col > last ? last : col;
}

// Writes rows a0 + [0, kRows) of block row i for batch entry b, skipping rows past r and past out.
template <int R, int kRows>
__device__ __forceinline__ void store_rows(const SparseLinearArgs& a, int64_t i, int64_t a0, int64_t r, int64_t b,
                                           const float (&acc)[kRows]) {
#pragma unroll
  for (int aa = 0; aa < kRows; ++aa) {
    int64_t row = i * r + a0 + aa;
    if ((R != 0 || a0 + aa < r) && row < a.out_features)
      a.y[b * a.out_features + row] = acc[aa] + (a.bias != nullptr ? a.bias[row] : 0.0f);
  }
}

// batch = NB ≤ kSmallBatch: lane l takes blocks row_ptr[i] + l, + l + 32, ... of block row i.
template <class Fmt, int R, int C, int NB>
__global__ void __launch_bounds__(kThreads) sparse_rows_kernel(const SparseLinearArgs a) {
  using T = typename Fmt::storage;
  constexpr int kRows = R != 0 ? R : kRowsPerPass;
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (i >= a.brows) return;  // whole warps leave together: the shuffles below see all 32 lanes
  const int64_t r = R != 0 ? R : a.r, c = C != 0 ? C : a.c;
  const T* values = static_cast<const T*>(a.values);
  const int64_t begin = a.row_ptr[i], end = a.row_ptr[i + 1];
  for (int64_t a0 = 0; a0 < r; a0 += kRows) {
    float acc[NB][kRows] = {};
    for (int64_t j = begin + lane; j < end; j += 32) {
      const float* xs = a.xt + block_col(a, j) * c * NB;  // xt [bcols·c, NB]
      const T* w = values + (j * r + a0) * c;             // rows a0.. of block j
      for (int64_t k = 0; k < c; ++k) {
        float xv[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) xv[b] = xs[k * NB + b];
#pragma unroll
        for (int aa = 0; aa < kRows; ++aa) {
          if (R == 0 && a0 + aa >= r) continue;
          float wv = Fmt::load(w[aa * c + k]);
#pragma unroll
          for (int b = 0; b < NB; ++b) acc[b][aa] += wv * xv[b];
        }
      }
    }
#pragma unroll
    for (int b = 0; b < NB; ++b) {
#pragma unroll
      for (int aa = 0; aa < kRows; ++aa) acc[b][aa] = warp_sum(acc[b][aa]);
      if (lane == 0) store_rows<R>(a, i, a0, r, b, acc[b]);
    }
  }
}

// batch > kSmallBatch: lane l owns batch entry tile·32 + l; the warp walks block row i's blocks in step.
template <class Fmt, int R, int C>
__global__ void __launch_bounds__(kThreads) sparse_batch_kernel(const SparseLinearArgs a) {
  using T = typename Fmt::storage;
  constexpr int kRows = R != 0 ? R : kRowsPerPass;
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (i >= a.brows) return;
  const int64_t r = R != 0 ? R : a.r, c = C != 0 ? C : a.c;
  const T* values = static_cast<const T*>(a.values);
  const int64_t begin = a.row_ptr[i], end = a.row_ptr[i + 1];
  const int64_t tiles = (a.batch + 31) / 32;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b = tile * 32 + lane;
    const bool active = b < a.batch;
    for (int64_t a0 = 0; a0 < r; a0 += kRows) {
      float acc[kRows] = {};
      for (int64_t j = begin; j < end; ++j) {
        const float* xs = a.xt + block_col(a, j) * c * a.batch + b;  // xt [bcols·c, batch], column b
        const T* w = values + (j * r + a0) * c;
        for (int64_t k = 0; k < c; ++k) {
          float xk = active ? xs[k * a.batch] : 0.0f;
#pragma unroll
          for (int aa = 0; aa < kRows; ++aa) {
            if (R == 0 && a0 + aa >= r) continue;
            acc[aa] += Fmt::load(w[aa * c + k]) * xk;
          }
        }
      }
      if (active) store_rows<R>(a, i, a0, r, b, acc);
    }
  }
}

template <class Fmt, int R, int C>
cudaError_t launch_shape(const SparseLinearArgs& a, cudaStream_t stream) {
  const dim3 block(kThreads);
  const int64_t warps_x = (a.brows + kWarps - 1) / kWarps;
  if (warps_x > kMaxGridX) return cudaErrorInvalidConfiguration;
  const unsigned grid_x = static_cast<unsigned>(warps_x);
  switch (a.batch) {
    case 1: sparse_rows_kernel<Fmt, R, C, 1><<<grid_x, block, 0, stream>>>(a); break;
    case 2: sparse_rows_kernel<Fmt, R, C, 2><<<grid_x, block, 0, stream>>>(a); break;
    case 3: sparse_rows_kernel<Fmt, R, C, 3><<<grid_x, block, 0, stream>>>(a); break;
    case kSmallBatch: sparse_rows_kernel<Fmt, R, C, kSmallBatch><<<grid_x, block, 0, stream>>>(a); break;
    default: {
      const int64_t tiles = (a.batch + 31) / 32;
      const dim3 grid(grid_x, static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY));
      sparse_batch_kernel<Fmt, R, C><<<grid, block, 0, stream>>>(a);
    }
  }
  return cudaGetLastError();
}

template <class Fmt>
cudaError_t launch_format(const SparseLinearArgs& a, cudaStream_t stream) {
  if (a.r == 1 && a.c == 1) return launch_shape<Fmt, 1, 1>(a, stream);
  if (a.r == 1) return launch_shape<Fmt, 1, 0>(a, stream);
  return launch_shape<Fmt, 0, 0>(a, stream);
}

}  // namespace

cudaError_t sparse_linear_cuda_launch(SparseValueKind kind, const SparseLinearArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.brows == 0) return cudaSuccess;  // nothing to write
  if (args.batch < 0 || args.r <= 0 || args.c <= 0 || args.bcols < 0) return cudaErrorInvalidValue;
  switch (kind) {
    case SparseValueKind::F32: return launch_format<F32>(args, stream);
    case SparseValueKind::BF16: return launch_format<BF16>(args, stream);
    case SparseValueKind::F16: return launch_format<F16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace slimrate

// CUDA kernels of the BackSlash rate ops, torch-free (launchers declared in rate_cuda.h).
// Multi-tensor: a launch covers up to kMaxTensors same-dtype tensors cut into kChunk-element
// chunks, one block per chunk; the block finds its tensor in a prefix table passed by value
// (the layout of apex's multi_tensor_apply, without its per-block tables).  Each block reduces
// its partial sums in double and adds them atomically into the caller's accumulators.
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/rate_cuda.h"
#include "kernels/rate_terms.h"

namespace slimrate {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 64 elements per thread: one double atomicAdd per 16 Ki elements stays far below the memory
// time (1 G float32 weights → 64 Ki atomics), while a small tensor (a bias) costs one block.
constexpr int64_t kChunk = 16384;
// The argument structs below hold 64 tensors in under 2 KB, inside the 4 KB kernel parameter limit
// of every CUDA version.
constexpr int kMaxTensors = 64;

// Tensor t of a launch owns blocks [first_block[t], first_block[t+1]); empty tensors are left out,
// so first_block is strictly increasing.  int blocks: 2^31 chunks of 16 Ki elements would be
// 2^45 elements, beyond any GPU's memory.
struct BlockMap {
  int64_t numel[kMaxTensors];
  int first_block[kMaxTensors + 1];
  int count;
};

template <class T>
struct StatsArgs {
  BlockMap map;
  const T* x[kMaxTensors];
};

template <class T>
struct GradArgs {
  BlockMap map;
  const T* theta[kMaxTensors];
  T* grad[kMaxTensors];
};

// log and exp in float32 for 16/32-bit storage: results are rounded to float32 or lower anyway,
// and double-precision transcendentals run at 1/2 (H100) to 1/64 (consumer GPUs) of the float rate.
struct F32Math {
  using real = float;
  SLIMRATE_HD static float log(float x) { return logf(x); }
  SLIMRATE_HD static float exp(float y) { return expf(y); }
};

template <class Fmt>
using DeviceMath = std::conditional_t<std::is_same_v<Fmt, F64>, LibMath, F32Math>;

// W elements loaded or stored as one access: W·sizeof(T) = 16 bytes gives 128-bit loads.
template <class T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <class T>
constexpr int kVecWidth = 16 / sizeof(T);

__device__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Largest t with first_block[t] <= block.
__device__ int tensor_of_block(const BlockMap& map, int block) {
  int lo = 0, hi = map.count - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (map.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// This block's chunk [begin, begin + len) of tensor t.
__device__ void chunk_of_block(const BlockMap& map, int t, int64_t& begin, int64_t& len) {
  begin = static_cast<int64_t>(blockIdx.x - map.first_block[t]) * kChunk;
  int64_t rest = map.numel[t] - begin;
  len = rest < kChunk ? rest : kChunk;
}

// Calls visit(i, width) over this block's share of [0, len): 16-byte packs when `vectorise`
// (chunk start aligned), then single elements for the rest; width is an integral_constant.
template <class T, class Visit>
__device__ void visit_chunk(int64_t len, bool vectorise, Visit visit) {
  constexpr int W = kVecWidth<T>;
  int64_t vec_end = vectorise ? len / W * W : 0;
  for (int64_t i = int64_t{threadIdx.x} * W; i < vec_end; i += kThreads * W)
    visit(i, std::integral_constant<int, W>{});
  for (int64_t i = vec_end + threadIdx.x; i < len; i += kThreads) visit(i, std::integral_constant<int, 1>{});
}

// Sums each v[k] over the block; the totals are valid in thread 0 only.
template <int N>
__device__ void block_sum(double (&v)[N]) {
  __shared__ double warp_sums[N][kWarps];
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int k = 0; k < N; ++k) {
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    if (lane == 0) warp_sums[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int k = 0; k < N; ++k) {
    v[k] = 0.0;
    for (int w = 0; w < kWarps; ++w) v[k] += warp_sums[k][w];
  }
}

// __grid_constant__: the argument struct is indexed by tensor at run time; this keeps it in
// parameter memory instead of a per-thread local copy.
template <class Fmt>
__global__ void __launch_bounds__(kThreads)
    rate_stats_kernel(const __grid_constant__ StatsArgs<typename Fmt::storage> args, double* sums) {
  using T = typename Fmt::storage;
  int t = tensor_of_block(args.map, blockIdx.x);
  int64_t begin, len;
  chunk_of_block(args.map, t, begin, len);
  const T* x = args.x[t] + begin;
  double acc[2] = {0.0, 0.0};  // Σ|x|, Σx²
  visit_chunk<T>(len, aligned16(x), [&](int64_t i, auto width) {
    using P = Pack<T, decltype(width)::value>;
    P p = *reinterpret_cast<const P*>(x + i);
#pragma unroll
    for (int j = 0; j < decltype(width)::value; ++j) {
      double v = Fmt::load(p.v[j]);
      acc[0] += fabs(v);
      acc[1] += v * v;
    }
  });
  block_sum(acc);
  if (threadIdx.x == 0) {
    atomicAdd(sums, acc[0]);
    atomicAdd(sums + 1, acc[1]);
  }
}

// theta and grad may be the same memory: each thread loads both packs before storing grad.
template <class Fmt>
__global__ void __launch_bounds__(kThreads)
    rate_grad_kernel(const __grid_constant__ GradArgs<typename Fmt::storage> args, double nu, double eps,
                     double scale, double inv_n, double* sum_r) {
  using T = typename Fmt::storage;
  int t = tensor_of_block(args.map, blockIdx.x);
  int64_t begin, len;
  chunk_of_block(args.map, t, begin, len);
  const T* theta = args.theta[t] + begin;
  T* grad = args.grad[t] + begin;
  double acc[1] = {0.0};
  visit_chunk<T>(len, aligned16(theta) && aligned16(grad), [&](int64_t i, auto width) {
    using P = Pack<T, decltype(width)::value>;
    P th = *reinterpret_cast<const P*>(theta + i);
    P g = *reinterpret_cast<const P*>(grad + i);
#pragma unroll
    for (int j = 0; j < decltype(width)::value; ++j) {
      auto term = rate_term<DeviceMath<Fmt>>(Fmt::load(th.v[j]), nu, eps);
      g.v[j] = Fmt::store(Fmt::load(g.v[j]) + scale * term.g);
      acc[0] += term.r;
    }
    *reinterpret_cast<P*>(grad + i) = g;
  });
  block_sum(acc);
  // Scaling each block's share by 1/N here saves a separate kernel for the mean.
  if (threadIdx.x == 0) atomicAdd(sum_r, acc[0] * inv_n);
}

// Packs the non-empty tensors among [0, count) into argument structs of up to kMaxTensors,
// set(args, slot, i) storing tensor i's pointers, and calls launch(args, blocks) for each.
template <class Args, class Set, class Launch>
cudaError_t launch_groups(const int64_t* numel, int count, Set set, Launch launch) {
  Args args{};
  int slot = 0, blocks = 0;
  auto flush = [&]() {
    args.map.first_block[slot] = blocks;
    args.map.count = slot;
    launch(args, blocks);
    slot = blocks = 0;
    return cudaGetLastError();
  };
  for (int i = 0; i < count; ++i) {
    if (numel[i] == 0) continue;
    args.map.numel[slot] = numel[i];
    args.map.first_block[slot] = blocks;
    set(args, slot, i);
    blocks += static_cast<int>((numel[i] + kChunk - 1) / kChunk);
    if (++slot == kMaxTensors) {
      cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
  }
  return slot > 0 ? flush() : cudaSuccess;
}

// Calls fn with the storage format tag of kind.
template <class Fn>
cudaError_t with_format(StorageKind kind, Fn&& fn) {
  switch (kind) {
    case StorageKind::F32: return fn(F32{});
    case StorageKind::F64: return fn(F64{});
    case StorageKind::BF16: return fn(BF16{});
    case StorageKind::F16: return fn(F16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rate_stats_cuda_launch(StorageKind kind, const void* const* xs, const int64_t* xs_numel, int count,
                                   double* sums, cudaStream_t stream) {
  return with_format(kind, [&](auto fmt) {
    using Fmt = decltype(fmt);
    using T = typename Fmt::storage;
    return launch_groups<StatsArgs<T>>(
        xs_numel, count, [&](StatsArgs<T>& args, int slot, int i) { args.x[slot] = static_cast<const T*>(xs[i]); },
        [&](const StatsArgs<T>& args, int blocks) {
          rate_stats_kernel<Fmt><<<blocks, kThreads, 0, stream>>>(args, sums);
        });
  });
}

cudaError_t rate_grad_cuda_launch(StorageKind kind, const void* const* params, void* const* grads,
                                  const int64_t* numel, int count, double nu, double eps, double scale,
                                  double inv_n, double* sum_r, cudaStream_t stream) {
  return with_format(kind, [&](auto fmt) {
    using Fmt = decltype(fmt);
    using T = typename Fmt::storage;
    return launch_groups<GradArgs<T>>(
        numel, count,
        [&](GradArgs<T>& args, int slot, int i) {
          args.theta[slot] = static_cast<const T*>(params[i]);
          args.grad[slot] = static_cast<T*>(grads[i]);
        },
        [&](const GradArgs<T>& args, int blocks) {
          rate_grad_kernel<Fmt><<<blocks, kThreads, 0, stream>>>(args, nu, eps, scale, inv_n, sum_r);
        });
  });
}

}  // namespace slimrate

// Torch-free CUDA launchers of the BackSlash rate ops (schemas in csrc/ops.cpp, ATen glue in
// rate_cuda_glue.cpp).  Each call takes a list of same-dtype contiguous device tensors as host
// arrays of pointers and sizes, covers them with as few launches as the kernel-argument limit
// allows, and adds its sums atomically into device doubles that the caller has zeroed.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace slimrate {

// What lies in memory: float32, float64, bfloat16, float16 (kernels/portable.h formats).
enum class StorageKind { F32, F64, BF16, F16 };

// sums[0] += Σ|x|, sums[1] += Σx² over xs[0..count) of xs_numel[i] elements each.
cudaError_t rate_stats_cuda_launch(StorageKind kind, const void* const* xs, const int64_t* xs_numel, int count,
                                   double* sums, cudaStream_t stream);

// grads[i][j] += scale·sign(θ)·(|θ|+eps)^(nu−1) for θ = params[i][j], and *sum_r += inv_n·Σ(|θ|+eps)^nu.
// grads[i] may equal params[i] (each element is read before it is written).
cudaError_t rate_grad_cuda_launch(StorageKind kind, const void* const* params, void* const* grads,
                                  const int64_t* numel, int count, double nu, double eps, double scale,
                                  double inv_n, double* sum_r, cudaStream_t stream);

}  // namespace slimrate

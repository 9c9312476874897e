// Torch-free CUDA launcher of sparse_linear (schema in csrc/ops.cpp, ATen glue in sparse_cuda_glue.cpp):
// y = x·Wᵀ + bias for W [out, in] in block-CSR form with blocks (r, c) (docs/sparse.md §1; python/slimrate/ops/sparse_format.py).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace slimrate {

// Value formats of the weight (kernels/portable.h): float32, bfloat16, float16.
enum class SparseValueKind { F32, BF16, F16 };

// Device pointers and sizes of one call. The caller has checked the indices (row_ptr nondecreasing
// from 0 to nblocks, col_idx in [0, bcols)); the kernels still clamp each block column into range.
struct SparseLinearArgs {
  const int64_t* row_ptr;  // [brows + 1], brows = ceil(out / r)
  const int32_t* col_idx;  // [nblocks]
  const void* values;      // [nblocks, r, c] in `kind`
  // x transposed and zero-padded, float32 [bcols·c, batch] (bcols = ceil(in / c)): row k is input
  // feature k of every batch row, so a warp reads consecutive batch entries, and rows in..bcols·c-1
  // are zeros, so no read of an edge block needs a guard.
  const float* xt;
  const float* bias;  // [out] float32, or nullptr
  float* y;           // [batch, out] float32, contiguous; every element is written
  int64_t batch, out_features, r, c, brows, bcols;
};

cudaError_t sparse_linear_cuda_launch(SparseValueKind kind, const SparseLinearArgs& args, cudaStream_t stream);

}  // namespace slimrate

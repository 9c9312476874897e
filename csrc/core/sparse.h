// The block-CSR product of sparse_linear (docs/sparse.md §1) on raw pointers: y = W·x in float32, for W
// [brows·r, bcols·c] stored as r×c blocks and x laid out by the caller as below. Callers check the inputs (the
// faces do); these functions never throw.
//
// Layout of x and y, by the tile width T = sparse_tile_width(batch):
// - T = 0 (batch 1, SpMV): xt float32 [bcols·c], the vector zero-padded past in_features; yt float32 [brows·r];
// - T > 0 (SpMM): x in ntiles = ⌈batch/T⌉ tiles of T batch columns, tile-major: xt float32 [ntiles][bcols·c][T]
//   with xt[t][k][j] = x[t·T + j][k], zero past in_features and past batch; yt float32 [ntiles][brows·r][T] the
//   same way. One tile of x stays in L2 while a few block rows (their values in L1) are swept over every tile.
// Every element of yt is written (unless the call returns bad_index). Block rows are split over threads with
// parallel_for; each output row is written by one thread, and its sum does not depend on the thread count.
#pragma once
#include <cstdint>

#include "core/float_format.h"
#include "core/status.h"

namespace slimrate::core {

// Block columns are uint16 when they fit (at batch 1 the kernel streams values and indices from memory, so 6
// instead of 8 bytes per fp32 weight is 25% less traffic), else int32.
enum class IndexFormat : uint8_t { u16, i32 };

// The largest block height r the kernels take (their accumulators are arrays of this many rows).
constexpr int64_t kSparseMaxBlockRows = 64;

struct BlockCsr {
  const int64_t* row_ptr;  // [brows + 1]: 0 = row_ptr[0] ≤ … ≤ row_ptr[brows] = nblocks
  const void* col_idx;     // [nblocks] block columns in `index` format; each < bcols (else bad_index)
  const void* values;      // [nblocks, r, c] row-major blocks in `format` (f32, bf16 or f16)
  IndexFormat index;
  FloatFormat format;
  int64_t brows, bcols, nblocks;
  int64_t r, c;  // 1 ≤ r ≤ kSparseMaxBlockRows, c ≥ 1
};

// Batch columns per tile: 0 for batch 1, else the narrowest of 8 (AVX2 register), 16 (AVX-512) and 32 that covers
// the batch, so little of a tile is padding; 32 reuses each loaded weight over the most columns.
inline int64_t sparse_tile_width(int64_t batch) { return batch == 1 ? 0 : batch <= 8 ? 8 : batch <= 16 ? 16 : 32; }

// yt = W·xt for `batch` columns of x in the layout above. Returns Status::bad_index when a block column is
// ≥ bcols (corrupt col_idx): the batch-1 kernels clamp each block column as they read it and report a clamp after
// their pass (a separate pass would cost another read of col_idx); the batched ones check the range first.
// yt is then unspecified.
Status sparse_matmul(const BlockCsr& w, const float* xt, float* yt, int64_t batch) noexcept;

}  // namespace slimrate::core

// Checker of the block-CSR product (core/sparse.h): cases "sparse_linear" from tools/core_cases.py.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "core/sparse.h"
#include "tests/check.h"

namespace slimrate::tests {

// Inputs: x [B, in] float, row_ptr, col_idx (int16 holding uint16, or int32), values [nblocks, r, c],
// out_features. Outputs: status (csrc/core/status.h's code) and, when ok, y [B, out] (float32 from the core).
void check_sparse_linear(const Case& c, Verdict& v) {
  const Array &x = c.get("x"), &row_ptr = c.get("row_ptr"), &col_idx = c.get("col_idx"), &values = c.get("values");
  if (x.shape.size() != 2 || values.shape.size() != 3 || row_ptr.dtype != DType::i64)
    throw std::runtime_error("x, values, row_ptr: expected [B, in], [nblocks, r, c] and int64");
  const int64_t batch = x.shape[0], in = x.shape[1], out = static_cast<int64_t>(c.scalar("out_features"));
  const int64_t r = values.shape[1], cols = values.shape[2];
  const core::BlockCsr w{reinterpret_cast<const int64_t*>(row_ptr.bytes.data()), col_idx.bytes.data(),
                         values.bytes.data(),
                         col_idx.dtype == DType::i32 ? core::IndexFormat::i32 : core::IndexFormat::u16,
                         FloatTensors::float_format(values), row_ptr.numel() - 1, (in + cols - 1) / cols,
                         values.shape[0], r, cols};
  // x in core/sparse.h's layout: zero-padded to bcols·c rows, tiles [ntiles][xrows][T] (a vector for T = 0).
  const int64_t tile = core::sparse_tile_width(batch), width = std::max<int64_t>(1, tile);
  const int64_t ntiles = tile == 0 ? 1 : (batch + tile - 1) / tile;
  const int64_t xrows = w.bcols * cols, yrows = w.brows * r;
  const std::vector<double> xv = x.values();
  std::vector<float> xt(ntiles * xrows * width, 0.0f), yt(ntiles * yrows * width);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < in; ++k)
      xt[((b / width) * xrows + k) * width + b % width] = static_cast<float>(xv[b * in + k]);
  core::Status status = core::sparse_matmul(w, xt.data(), yt.data(), batch);
  v.compare(c, "status", {static_cast<double>(status)});
  if (status != core::Status::ok) return;
  std::vector<double> y(batch * out);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t o = 0; o < out; ++o) y[b * out + o] = yt[((b / width) * yrows + o) * width + b % width];
  v.compare(c, "y", y);
}

}  // namespace slimrate::tests

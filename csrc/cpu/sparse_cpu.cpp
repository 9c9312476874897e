// CPU face of sparse_linear (schema in csrc/ops.cpp): y = x·Wᵀ + b with W block-CSR. Checks (sparse_inputs.h),
// x copied once into the zero-padded float32 layout of csrc/core/sparse.h (so every read is in bounds), the
// torch-free kernels on raw pointers, then y[:B, :out] + b in x's dtype.
#include <ATen/ATen.h>
#include <ATen/native/Resize.h>
#include <torch/library.h>

#include <algorithm>

#include "core/sparse.h"
#include "cpu/core_face.h"
#include "cpu/float_formats.h"
#include "sparse_inputs.h"

namespace slimrate {
namespace {

core::BlockCsr block_csr(const SparseInputs& in) {
  const bool i32 = in.col_idx.scalar_type() == at::kInt;
  return {in.row_ptr.const_data_ptr<int64_t>(), in.col_idx.const_data_ptr(), in.values.const_data_ptr(),
          i32 ? core::IndexFormat::i32 : core::IndexFormat::u16, format_of(in.values.scalar_type()),
          in.brows, in.bcols, in.nblocks, in.r, in.c};
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias) {
  SparseInputs in = sparse_inputs(x, row_ptr, col_idx, values, out_features, bias, at::kCPU);
  TORCH_CHECK(in.r <= core::kSparseMaxBlockRows, "values: block rows r = ", in.r, " > ", core::kSparseMaxBlockRows,
              " are not supported on CPU; use a smaller block");
  TORCH_CHECK(in.nblocks == 0 || in.bcols > 0, "col_idx: x has no columns (in_features = 0) but the weight stores ",
              in.nblocks, " blocks; the sparse weight does not match x");
  TORCH_CHECK(in.col_idx.scalar_type() == at::kInt || in.bcols <= 65536, "col_idx: int16 (uint16) block columns "
              "address at most 65536 block columns, the input has ", in.bcols, "; use int32 col_idx");
  // x as float32, zero-padded to bcols·c rows: a vector for batch 1, else tiles [ntiles][xrows][T].
  const int64_t batch = in.batch, xrows = in.bcols * in.c, yrows = in.brows * in.r;
  const int64_t tile = core::sparse_tile_width(batch), ntiles = tile == 0 ? 1 : (batch + tile - 1) / tile;
  const int64_t width = std::max<int64_t>(1, tile);
  at::Tensor xt;
  if (tile == 0 && x.scalar_type() == at::kFloat && x.is_contiguous() && xrows == in.in_features) {
    xt = x;  // a float32 vector already: no copy (small layers are dominated by this glue)
  } else {
    at::Tensor padded = at::zeros({ntiles * width, xrows}, x.options().dtype(at::kFloat));
    padded.narrow(0, 0, batch).narrow(1, 0, in.in_features).copy_(x);
    xt = padded.view({ntiles, width, xrows}).transpose(1, 2).contiguous();  // [ntiles][xrows][width]
  }
  at::Tensor yt = at::empty({ntiles, yrows, width}, x.options().dtype(at::kFloat));
  use_torch_threads();
  core::Status status = core::sparse_matmul(block_csr(in), xt.const_data_ptr<float>(), yt.data_ptr<float>(), batch);
  TORCH_CHECK(status != core::Status::bad_index, "col_idx: a block column is >= ceil(in_features / c) = ", in.bcols,
              " or negative; the sparse weight is corrupt");
  check_core(status);
  // Un-tile and drop the padding (a view), add the bias, then one pass into x's dtype.
  at::Tensor y32 = yt.transpose(1, 2).reshape({ntiles * width, yrows}).narrow(0, 0, batch).narrow(1, 0, out_features);
  if (in.bias.defined()) y32.add_(in.bias);  // in float32, before the one rounding into x's dtype
  if (tile == 0 && x.scalar_type() == at::kFloat) return y32;
  return at::empty({batch, out_features}, x.options()).copy_(y32);
}

// sparse_linear.out: the product above copied into out, resized to [B, out_features] as ATen's out= ops do.
at::Tensor& sparse_linear_out_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& values, int64_t out_features,
                                  const std::optional<at::Tensor>& bias, at::Tensor& out) {
  TORCH_CHECK(out.device() == x.device(), "out: expected a tensor on ", x.device(), ", got ", out.device());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out: expected x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  at::Tensor y = sparse_linear_cpu(x, row_ptr, col_idx, values, out_features, bias);
  at::native::resize_output(out, y.sizes());
  return out.copy_(y);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_linear.out", &sparse_linear_out_cpu);
}

}  // namespace slimrate

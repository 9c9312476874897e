// ExecuTorch kernel of slimrate::sparse_linear.out (schema in csrc/ops.cpp, docs/edge.md §2): y = x·Wᵀ + b
// with W block-CSR. A thin face of the torch-free core: the checks that keep memory safe (each failure logs
// what was expected and fails the kernel context, so Method::execute returns InvalidArgument), x laid out as
// csrc/core/sparse.h documents, core::sparse_matmul, then bias and the one rounding into x's dtype.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include "core/float_format.h"
#include "core/sparse.h"

namespace slimrate::edge {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

// The core's format of a float32/bfloat16/float16 tensor (float64 too for the bias); nullopt otherwise.
std::optional<core::FloatFormat> float_format(ScalarType st, bool with_f64 = false) {
  switch (st) {
    case ScalarType::Float: return core::FloatFormat::f32;
    case ScalarType::BFloat16: return core::FloatFormat::bf16;
    case ScalarType::Half: return core::FloatFormat::f16;
    case ScalarType::Double: return with_f64 ? std::optional(core::FloatFormat::f64) : std::nullopt;
    default: return std::nullopt;
  }
}

bool contiguous(const Tensor& t) {
  return executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim());
}

// 0 = row_ptr[0] ≤ … ≤ row_ptr[n-1] = nblocks: the offsets the kernel reads values and col_idx at.
bool row_ptr_valid(const int64_t* p, int64_t n, int64_t nblocks) {
  int64_t decreasing = 0;  // no early exit: a branch-free pass vectorises
  for (int64_t i = 1; i < n; ++i) decreasing |= static_cast<int64_t>(p[i] < p[i - 1]);
  return p[0] == 0 && p[n - 1] == nblocks && decreasing == 0;
}

// A float32 work buffer of n elements from the runtime's temp allocator (freed after the kernel returns).
float* temp_floats(KernelRuntimeContext& ctx, int64_t n) {
  auto memory = ctx.allocate_temp(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float), 64);
  return memory.ok() ? static_cast<float*>(memory.get()) : nullptr;
}

Tensor& sparse_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& row_ptr, const Tensor& col_idx,
                          const Tensor& values, int64_t out_features, const std::optional<Tensor>& bias,
                          Tensor& out) {
  const auto x_format = float_format(x.scalar_type());
  const auto w_format = float_format(values.scalar_type());
  ET_KERNEL_CHECK_MSG(ctx, x_format && x.dim() == 2 && contiguous(x), InvalidArgument, out,
                      "sparse_linear: x: expected a contiguous 2-D float32/bfloat16/float16 tensor");
  ET_KERNEL_CHECK_MSG(ctx, w_format && values.dim() == 3 && values.size(1) > 0 && values.size(2) > 0 &&
                      values.size(1) <= core::kSparseMaxBlockRows && contiguous(values), InvalidArgument, out,
                      "sparse_linear: values: expected contiguous float32/bfloat16/float16 [nblocks, r, c] blocks "
                      "with 1 <= r <= %d and c >= 1", static_cast<int>(core::kSparseMaxBlockRows));
  ET_KERNEL_CHECK_MSG(ctx, out_features >= 0, InvalidArgument, out,
                      "sparse_linear: out_features: expected >= 0, got %lld", static_cast<long long>(out_features));
  const int64_t batch = x.size(0), in_features = x.size(1), nblocks = values.size(0);
  const int64_t r = values.size(1), c = values.size(2);
  const int64_t brows = (out_features + r - 1) / r, bcols = (in_features + c - 1) / c;
  const bool i32 = col_idx.scalar_type() == ScalarType::Int;
  ET_KERNEL_CHECK_MSG(ctx, (i32 || col_idx.scalar_type() == ScalarType::Short) && col_idx.dim() == 1 &&
                      col_idx.numel() == nblocks && contiguous(col_idx), InvalidArgument, out,
                      "sparse_linear: col_idx: expected %lld int32 (or int16 holding uint16 bits) block columns",
                      static_cast<long long>(nblocks));
  ET_KERNEL_CHECK_MSG(ctx, i32 || bcols <= 65536, InvalidArgument, out,
                      "sparse_linear: col_idx: int16 block columns address at most 65536, x has %lld",
                      static_cast<long long>(bcols));
  ET_KERNEL_CHECK_MSG(ctx, nblocks == 0 || bcols > 0, InvalidArgument, out,
                      "sparse_linear: x has no columns but the weight stores %lld blocks",
                      static_cast<long long>(nblocks));
  ET_KERNEL_CHECK_MSG(ctx, row_ptr.scalar_type() == ScalarType::Long && row_ptr.dim() == 1 &&
                      row_ptr.numel() == brows + 1 && contiguous(row_ptr) &&
                      row_ptr_valid(row_ptr.const_data_ptr<int64_t>(), brows + 1, nblocks), InvalidArgument, out,
                      "sparse_linear: row_ptr: expected %lld nondecreasing int64 offsets from 0 to nblocks = %lld",
                      static_cast<long long>(brows + 1), static_cast<long long>(nblocks));
  const auto b_format = bias ? float_format(bias->scalar_type(), true) : std::nullopt;
  ET_KERNEL_CHECK_MSG(ctx, !bias || (b_format && bias->dim() == 1 && bias->numel() == out_features &&
                      contiguous(*bias)), InvalidArgument, out,
                      "sparse_linear: bias: expected a contiguous float tensor of shape [%lld]",
                      static_cast<long long>(out_features));
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == x.scalar_type() && contiguous(out), InvalidArgument, out,
                      "sparse_linear: out: expected a contiguous tensor of x's dtype");
  const SizesType out_sizes[2] = {static_cast<SizesType>(batch), static_cast<SizesType>(out_features)};
  const Error resized = executorch::runtime::resize_tensor(out, {out_sizes, 2});
  ET_KERNEL_CHECK_MSG(ctx, resized == Error::Ok, InvalidArgument, out, "sparse_linear: out: cannot be resized to "
                      "[%lld, %lld]", static_cast<long long>(batch), static_cast<long long>(out_features));
  if (batch == 0 || out_features == 0) return out;

  // x as float32, zero-padded to bcols·c rows: a vector for batch 1, else tiles [ntiles][xrows][T].
  const int64_t xrows = bcols * c, yrows = brows * r;
  const int64_t tile = core::sparse_tile_width(batch), ntiles = tile == 0 ? 1 : (batch + tile - 1) / tile;
  const int64_t width = std::max<int64_t>(1, tile);
  const bool f32 = *x_format == core::FloatFormat::f32;
  const bool x_as_is = tile == 0 && f32 && xrows == in_features;  // a float32 vector already: no copy
  const bool y_in_out = tile == 0 && f32 && yrows == out_features;
  const float* xt = x_as_is ? x.const_data_ptr<float>() : nullptr;
  float* yt = y_in_out ? out.mutable_data_ptr<float>() : temp_floats(ctx, ntiles * yrows * width);
  float* xbuf = x_as_is ? nullptr : temp_floats(ctx, ntiles * xrows * width);
  ET_KERNEL_CHECK_MSG(ctx, yt && (x_as_is || xbuf), MemoryAllocationFailed, out,
                      "sparse_linear: no temp memory for the kernel's %lld-float work buffers; run the method with "
                      "a temp allocator (extension::Module provides one)",
                      static_cast<long long>(ntiles * (xrows + yrows) * width));
  if (!x_as_is) {
    std::memset(xbuf, 0, static_cast<size_t>(ntiles * xrows * width) * sizeof(float));
    core::with_f32_f16_format(*x_format, [&](auto fmt) {
      using Fmt = decltype(fmt);
      const auto* src = static_cast<const typename Fmt::storage*>(x.const_data_ptr());
      for (int64_t b = 0; b < batch; ++b)  // xt[t][k][j] = x[t·T + j][k]
        for (int64_t k = 0; k < in_features; ++k)
          xbuf[((b / width) * xrows + k) * width + b % width] = Fmt::load(src[b * in_features + k]);
    });
    xt = xbuf;
  }
  const core::BlockCsr w{row_ptr.const_data_ptr<int64_t>(), col_idx.const_data_ptr(), values.const_data_ptr(),
                         i32 ? core::IndexFormat::i32 : core::IndexFormat::u16, *w_format, brows, bcols, nblocks,
                         r, c};
  const core::Status status = core::sparse_matmul(w, xt, yt, batch);
  ET_KERNEL_CHECK_MSG(ctx, status == core::Status::ok, InvalidArgument, out,  // bad_index, the only other status
                      "sparse_linear: col_idx: a block column is >= ceil(in_features / c) = %lld; the sparse weight "
                      "is corrupt", static_cast<long long>(bcols));
  // Add the bias in float32, then un-tile with one rounding into x's dtype (nothing to move when y is out).
  const auto at = [&](int64_t b, int64_t n) { return ((b / width) * yrows + n) * width + b % width; };
  if (bias) core::with_format(*b_format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    const auto* b_data = static_cast<const typename Fmt::storage*>(bias->const_data_ptr());
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t n = 0; n < out_features; ++n) yt[at(b, n)] += static_cast<float>(Fmt::load(b_data[n]));
  });
  if (!y_in_out) core::with_f32_f16_format(*x_format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    auto* dst = static_cast<typename Fmt::storage*>(out.mutable_data_ptr());
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t n = 0; n < out_features; ++n) dst[b * out_features + n] = Fmt::store(yt[at(b, n)]);
  });
  return out;
}

}  // namespace
}  // namespace slimrate::edge

EXECUTORCH_LIBRARY(slimrate, "sparse_linear.out", slimrate::edge::sparse_linear_out);

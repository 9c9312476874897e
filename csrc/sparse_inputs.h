// Checked inputs of sparse_linear (schema in csrc/ops.cpp): the ATen glue shared by csrc/cpu and csrc/cuda.
// These checks keep a direct torch.ops.slimrate.sparse_linear call memory-safe; the Python face
// (python/slimrate/ops/sparse.py) checks the user's arguments first.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace slimrate {

// W [out_features, in_features] in block-CSR form with blocks (r, c) (docs/sparse.md §1; python/slimrate/ops/sparse_format.py).
struct SparseInputs {
  at::Tensor x;        // [batch, in_features] as given (any strides): each backend lays out its own copy
  at::Tensor row_ptr;  // [brows + 1] int64, contiguous, checked: 0 = row_ptr[0] <= ... <= row_ptr[brows] = nblocks
  at::Tensor col_idx;  // [nblocks] int32 (int16 = uint16 bits on CPU), contiguous; range checked here off the CPU
  at::Tensor values;   // [nblocks, r, c] float32/bfloat16/float16, contiguous
  at::Tensor bias;     // [out_features] any float dtype, contiguous; undefined when None
  int64_t batch = 0, in_features = 0, out_features = 0;
  int64_t r = 0, c = 0, brows = 0, bcols = 0, nblocks = 0;
};

inline bool is_sparse_float(at::ScalarType st) { return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf; }

inline void check_sparse_device(const at::Tensor& t, const char* what, const at::Device& device) {
  TORCH_CHECK(t.device() == device, what, ": expected a tensor on ", device, ", got ", t.device());
}

// row_ptr of a CPU tensor: one pass, no copy.
inline void check_row_ptr_cpu(const at::Tensor& row_ptr, int64_t nblocks) {
  const int64_t* p = row_ptr.const_data_ptr<int64_t>();
  const int64_t n = row_ptr.numel();
  TORCH_CHECK(p[0] == 0, "row_ptr: expected row_ptr[0] = 0, got ", p[0]);
  TORCH_CHECK(p[n - 1] == nblocks, "row_ptr: expected row_ptr[-1] = nblocks = ", nblocks, ", got ", p[n - 1]);
  int64_t decreasing = 0;  // no early exit: a branch-free pass vectorises
  for (int64_t i = 1; i < n; ++i) decreasing |= static_cast<int64_t>(p[i] < p[i - 1]);
  TORCH_CHECK(decreasing == 0, "row_ptr: expected nondecreasing offsets; the sparse weight is corrupt");
}

// row_ptr and the col_idx range of device tensors, with torch reductions and a single device→host copy
// (one synchronisation per call).
inline void check_indices_on_device(const SparseInputs& in) {
  const at::Tensor& rp = in.row_ptr;
  auto no = at::zeros({}, rp.options().dtype(at::kBool));
  at::Tensor col_bad = no;
  if (in.nblocks > 0) {
    auto [lo, hi] = at::aminmax(in.col_idx);
    col_bad = lo.lt(0).logical_or(hi.ge(in.bcols));
  }
  at::Tensor flags = at::stack({rp.select(0, 0).ne(0), rp.select(0, in.brows).ne(in.nblocks),
                                rp.narrow(0, 1, in.brows).lt(rp.narrow(0, 0, in.brows)).any(), col_bad})
                         .cpu();
  const bool* f = flags.const_data_ptr<bool>();
  TORCH_CHECK(!f[0] && !f[1], "row_ptr: expected row_ptr[0] = 0 and row_ptr[-1] = nblocks = ", in.nblocks,
              "; the sparse weight is corrupt");
  TORCH_CHECK(!f[2], "row_ptr: expected nondecreasing offsets; the sparse weight is corrupt");
  TORCH_CHECK(!f[3], "col_idx: a block column is >= ceil(in_features / c) = ", in.bcols,
              " or negative; the sparse weight is corrupt");
}

// Checks every argument of sparse_linear for a kernel on `device` and returns contiguous tensors and sizes.
// Data checks: row_ptr on every device; the col_idx range only off the CPU, since the CPU kernels clamp
// each block column as they read it and report a clamp after their pass (a separate pass would cost
// another read of col_idx), while on CUDA it shares the one synchronisation of row_ptr's check.
inline SparseInputs sparse_inputs(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& values, int64_t out_features,
                                  const std::optional<at::Tensor>& bias, const at::Device& device) {
  check_sparse_device(x, "x", device);
  check_sparse_device(row_ptr, "row_ptr", device);
  check_sparse_device(col_idx, "col_idx", device);
  check_sparse_device(values, "values", device);
  TORCH_CHECK(is_sparse_float(x.scalar_type()), "x: expected float32/bfloat16/float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [batch, in_features] tensor, got shape ", x.sizes());
  TORCH_CHECK(is_sparse_float(values.scalar_type()), "values: expected float32/bfloat16/float16, got ",
              values.scalar_type());
  TORCH_CHECK(values.dim() == 3 && values.size(1) > 0 && values.size(2) > 0,
              "values: expected a [nblocks, r, c] tensor with r, c > 0, got shape ", values.sizes());
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1,
              "row_ptr: expected a 1-D int64 tensor, got ", row_ptr.scalar_type(), " of shape ", row_ptr.sizes());
  TORCH_CHECK((col_idx.scalar_type() == at::kInt || col_idx.scalar_type() == at::kShort) && col_idx.dim() == 1,
              "col_idx: expected a 1-D int32 tensor (or int16 holding uint16 bits), got ", col_idx.scalar_type(),
              " of shape ", col_idx.sizes());
  TORCH_CHECK(out_features >= 0, "out_features: expected >= 0, got ", out_features);

  SparseInputs in;
  in.batch = x.size(0);
  in.in_features = x.size(1);
  in.out_features = out_features;
  in.nblocks = values.size(0);
  in.r = values.size(1);
  in.c = values.size(2);
  in.brows = (out_features + in.r - 1) / in.r;
  in.bcols = (in.in_features + in.c - 1) / in.c;
  TORCH_CHECK(col_idx.numel() == in.nblocks, "col_idx: expected ", in.nblocks, " entries (one per block of values), got ",
              col_idx.numel());
  TORCH_CHECK(row_ptr.numel() == in.brows + 1, "row_ptr: expected ceil(out_features / r) + 1 = ", in.brows + 1,
              " entries for out_features = ", out_features, " and r = ", in.r, ", got ", row_ptr.numel());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_sparse_device(b, "bias", device);
    TORCH_CHECK(at::isFloatingType(b.scalar_type()), "bias: expected a float dtype, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, "bias: expected shape [", out_features, "], got ",
                b.sizes());
    in.bias = b.contiguous();
  }
  in.x = x;
  in.row_ptr = row_ptr.contiguous();
  in.col_idx = col_idx.contiguous();
  // int16 col_idx holds uint16 block columns (< 65536: half the index bytes); the CPU kernels read them
  // as such, other devices get int32 copies.
  if (col_idx.scalar_type() == at::kShort && !device.is_cpu())
    in.col_idx = at::bitwise_and(col_idx.to(at::kInt), 0xFFFF);
  in.values = values.contiguous();
  if (device.is_cpu()) {
    check_row_ptr_cpu(in.row_ptr, in.nblocks);
  } else {
    check_indices_on_device(in);
  }
  return in;
}

}  // namespace slimrate

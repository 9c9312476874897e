// ATen glue of the CUDA sparse_linear (schema in csrc/ops.cpp, kernels in sparse_cuda.cu): checks that keep
// memory safe (csrc/sparse_inputs.h, one synchronisation for the index checks), then x transposed into a
// zero-padded float32 xt, one launch writing float32 y [batch, out] with the bias, and y in x's dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/sparse_cuda.h"
#include "sparse_inputs.h"

namespace slimrate {
namespace {

SparseValueKind value_kind(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return SparseValueKind::F32;
    case at::kBFloat16: return SparseValueKind::BF16;
    default: return SparseValueKind::F16;  // sparse_inputs admits only these three
  }
}

// xt [bcols·c, batch] float32: x transposed (batch entries of one feature side by side, as the kernels read
// them) and zero rows past in_features, so edge blocks never read outside x. For batch 1 with float32 x
// and in_features a multiple of c this is x itself, no copy.
at::Tensor transposed_padded_x(const SparseInputs& in) {
  const int64_t rows = in.bcols * in.c;
  if (in.batch == 1 && in.x.scalar_type() == at::kFloat && rows == in.in_features)
    return in.x.contiguous().view({rows, 1});
  at::Tensor xt = at::empty({rows, in.batch}, in.x.options().dtype(at::kFloat));
  xt.narrow(0, 0, in.in_features).copy_(in.x.t());
  xt.narrow(0, in.in_features, rows - in.in_features).zero_();
  return xt;
}

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                              const at::Tensor& values, int64_t out_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  const at::Device device = x.device();
  c10::cuda::CUDAGuard guard(device);
  SparseInputs in = sparse_inputs(x, row_ptr, col_idx, values, out_features, bias, device);
  at::Tensor y = at::empty({in.batch, out_features}, x.options().dtype(at::kFloat));
  if (y.numel() == 0) return y.to(x.scalar_type());
  at::Tensor xt = transposed_padded_x(in);
  at::Tensor bias_f32 = in.bias.defined() ? in.bias.to(at::kFloat).contiguous() : at::Tensor();

  SparseLinearArgs args{};
  args.row_ptr = in.row_ptr.const_data_ptr<int64_t>();
  args.col_idx = in.col_idx.const_data_ptr<int32_t>();
  args.values = in.values.const_data_ptr();
  args.xt = xt.const_data_ptr<float>();
  args.bias = bias_f32.defined() ? bias_f32.const_data_ptr<float>() : nullptr;
  args.y = y.mutable_data_ptr<float>();
  args.batch = in.batch;
  args.out_features = out_features;
  args.r = in.r;
  args.c = in.c;
  args.brows = in.brows;
  args.bcols = in.bcols;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaError_t err = sparse_linear_cuda_launch(value_kind(in.values.scalar_type()), args, stream);
  TORCH_CHECK(err == cudaSuccess, "sparse_linear: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return y.to(x.scalar_type());  // no copy for float32 x
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CUDA, m) { m.impl("sparse_linear", &sparse_linear_cuda); }

}  // namespace slimrate

// ATen glue of the CUDA rate ops (schemas in csrc/ops.cpp, kernels in rate_cuda.cu): checks that
// keep memory safe and contiguous copies (csrc/rate_inputs.h), one launcher call per dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/rate_cuda.h"
#include "rate_inputs.h"

namespace slimrate {
namespace {

constexpr StorageKind kKinds[] = {StorageKind::F32, StorageKind::F64, StorageKind::BF16, StorageKind::F16};

at::Device first_cuda_device(at::TensorList tensors, const char* what) {
  TORCH_CHECK(!tensors.empty(), what, ": expected at least one tensor");
  TORCH_CHECK(tensors[0].is_cuda(), what, "[0]: expected a CUDA tensor, got ", tensors[0].device());
  return tensors[0].device();
}

StorageKind kind_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return StorageKind::F32;
    case at::kDouble: return StorageKind::F64;
    case at::kBFloat16: return StorageKind::BF16;
    default: return StorageKind::F16;
  }
}

// Pointers and sizes of the tensors of one dtype, in list order, as the launchers take them.
struct KindGroup {
  std::vector<const void*> src;
  std::vector<void*> dst;
  std::vector<int64_t> numel;
};

KindGroup group_of(StorageKind kind, const std::vector<at::Tensor>& src, const std::vector<at::Tensor>* dst) {
  KindGroup g;
  for (size_t i = 0; i < src.size(); ++i) {
    if (kind_of(src[i].scalar_type()) != kind) continue;
    g.src.push_back(src[i].const_data_ptr());
    if (dst) g.dst.push_back((*dst)[i].data_ptr());
    g.numel.push_back(src[i].numel());
  }
  return g;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor rate_stats_cuda(at::TensorList tensors) {
  at::Device device = first_cuda_device(tensors, "tensors");
  c10::cuda::CUDAGuard guard(device);
  RateInputs in = stats_inputs(tensors, device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  auto out = at::zeros({3}, at::dtype(at::kDouble).device(device));  // N, Σ|θ|, Σθ²
  out.select(0, 0).fill_(static_cast<double>(in.numel));
  for (StorageKind kind : kKinds) {
    KindGroup g = group_of(kind, in.thetas, nullptr);
    check_launch(rate_stats_cuda_launch(kind, g.src.data(), g.numel.data(), static_cast<int>(g.src.size()),
                                        out.data_ptr<double>() + 1, stream),
                 "rate_stats");
  }
  return out;
}

at::Tensor rate_grad_cuda(at::TensorList params, at::TensorList grads, double lam, double nu, double eps) {
  at::Device device = first_cuda_device(params, "params");
  c10::cuda::CUDAGuard guard(device);
  RateInputs in = grad_inputs(params, grads, nu, eps, device);
  int64_t n = in.numel;
  auto sum_r = at::zeros({}, at::dtype(at::kDouble).device(device));
  if (n == 0) return sum_r;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  double inv_n = 1.0 / static_cast<double>(n);
  for (StorageKind kind : kKinds) {
    KindGroup g = group_of(kind, in.thetas, &in.grads);
    check_launch(rate_grad_cuda_launch(kind, g.src.data(), g.dst.data(), g.numel.data(),
                                       static_cast<int>(g.src.size()), nu, eps, lam * nu * inv_n, inv_n,
                                       sum_r.data_ptr<double>(), stream),
                 "rate_grad_");
  }
  write_back(grads, in);
  return sum_r;  // Σ r/N, the kernels scale each block's share
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CUDA, m) {
  m.impl("rate_stats", &rate_stats_cuda);
  m.impl("rate_grad_", &rate_grad_cuda);
}

}  // namespace slimrate

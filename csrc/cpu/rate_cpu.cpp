// CPU face of the BackSlash rate ops (schemas in csrc/ops.cpp): checks and contiguous copies (rate_inputs.h),
// then the torch-free kernels of csrc/core/rate.h on raw pointers, then results copied back into strided grads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "core/rate.h"
#include "cpu/core_face.h"
#include "cpu/float_formats.h"
#include "rate_inputs.h"

namespace slimrate {
namespace {

// The raw pointer lists core/rate.h takes, from checked contiguous tensors.
struct CoreLists {
  std::vector<const void*> thetas;
  std::vector<void*> grads;
  std::vector<int64_t> numels;
  std::vector<core::FloatFormat> formats;
};

CoreLists core_lists(const RateInputs& in) {
  CoreLists lists;
  for (const at::Tensor& t : in.thetas) {
    lists.thetas.push_back(t.const_data_ptr());
    lists.numels.push_back(t.numel());
    lists.formats.push_back(format_of(t.scalar_type()));
  }
  for (const at::Tensor& g : in.grads) lists.grads.push_back(g.data_ptr());
  return lists;
}

at::Tensor rate_stats_cpu(at::TensorList tensors) {
  RateInputs in = stats_inputs(tensors, at::kCPU);
  CoreLists lists = core_lists(in);
  double out[3];
  use_torch_threads();
  check_core(core::rate_stats(lists.thetas.data(), lists.numels.data(), lists.formats.data(), lists.numels.size(),
                              out));
  return at::tensor({out[0], out[1], out[2]}, at::dtype(at::kDouble));
}

at::Tensor rate_grad_cpu(at::TensorList params, at::TensorList grads, double lam, double nu, double eps) {
  RateInputs in = grad_inputs(params, grads, nu, eps, at::kCPU);
  CoreLists lists = core_lists(in);
  double r = 0.0;
  use_torch_threads();
  check_core(core::rate_grad(lists.thetas.data(), lists.grads.data(), lists.numels.data(), lists.formats.data(),
                             lists.numels.size(), lam, nu, eps, &r));
  write_back(grads, in);
  return at::scalar_tensor(r, at::dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("rate_stats", &rate_stats_cpu);
  m.impl("rate_grad_", &rate_grad_cpu);
}

}  // namespace slimrate

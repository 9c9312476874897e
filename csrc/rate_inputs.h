// Checked, contiguous inputs of the rate ops: the ATen glue shared by csrc/cpu and csrc/cuda.
// These checks keep a direct torch.ops.slimrate call memory-safe; the Python faces check first.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace slimrate {

// The dispatcher sends a list to a device's kernel when any tensor in it is there, so each is checked.
inline void check_rate_tensor(const at::Tensor& t, const char* what, size_t i, const at::Device& device) {
  TORCH_CHECK(t.device() == device, what, "[", i, "]: expected a tensor on ", device, ", got ", t.device());
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, what, "[", i,
              "]: expected float32/float64/bfloat16/float16, got ", st);
}

struct RateInputs {
  std::vector<at::Tensor> thetas;  // contiguous (a copy only where the caller's tensor is strided)
  std::vector<at::Tensor> grads;   // likewise; write_back copies results into strided originals
  int64_t numel = 0;               // N, over all tensors
};

inline RateInputs stats_inputs(at::TensorList tensors, const at::Device& device) {
  RateInputs in;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_rate_tensor(tensors[i], "tensors", i, device);
    in.thetas.push_back(tensors[i].contiguous());
    in.numel += tensors[i].numel();
  }
  return in;
}

inline RateInputs grad_inputs(at::TensorList params, at::TensorList grads, double nu, double eps,
                              const at::Device& device) {
  TORCH_CHECK(params.size() == grads.size(), "grads: expected ", params.size(), " tensors, got ", grads.size());
  TORCH_CHECK(nu > 0 && eps >= 0, "nu must be > 0 and eps >= 0, got nu=", nu, " eps=", eps);
  RateInputs in = stats_inputs(params, device);
  for (size_t i = 0; i < grads.size(); ++i) {
    check_rate_tensor(grads[i], "grads", i, device);
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type(),
                "grads[", i, "]: expected shape ", params[i].sizes(), " and dtype ", params[i].scalar_type(),
                ", got ", grads[i].sizes(), " ", grads[i].scalar_type());
    in.grads.push_back(grads[i].contiguous());
  }
  return in;
}

// Copies each result into the caller's grad where grad_inputs had to make a contiguous copy.
inline void write_back(at::TensorList grads, const RateInputs& in) {
  for (size_t i = 0; i < grads.size(); ++i)
    if (!in.grads[i].is_same(grads[i])) grads[i].copy_(in.grads[i]);
}

}  // namespace slimrate

// Every slimrate op schema, in one place (DESIGN.md "One op, end to end").
// Kernels register per device: csrc/cpu/*.cpp (CPU), csrc/cuda/*_glue.cpp (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(slimrate, m) {
  // (N, Σ|θ|, Σθ²) over all tensors, float64 [3]: the moments behind the BackSlash shape estimate.
  m.def("rate_stats(Tensor[] tensors) -> Tensor");
  // grads[i] += lam·∂R/∂params[i] for R = (1/N) Σ (|θ|+eps)^nu over all params; returns R (float64 []).
  m.def("rate_grad_(Tensor[] params, Tensor(a!)[] grads, float lam, float nu, float eps) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef SLIMRATE_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}

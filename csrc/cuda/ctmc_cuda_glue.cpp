// ATen glue of the CUDA CTMC ops (schemas in csrc/ops.cpp, kernels in ctmc_cuda.cu): the checks of
// csrc/ctmc_inputs.h (metadata, then the data with torch reductions and one synchronisation), contiguous
// copies, one launcher call per dtype on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ctmc_inputs.h"
#include "cuda/ctmc_cuda.h"

namespace slimrate {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

template <class T>
CtmcDeviceArgs<T> device_args(const CtmcStructure& s, int64_t B) {
  return {s.lam.const_data_ptr<T>(), s.perm.const_data_ptr<int64_t>(), s.perm_inv.const_data_ptr<int64_t>(), B, s.L,
          s.V};
}

// Token ids [B, L] named `what`, checked against the structure's L; returns B.
int64_t token_batch(const at::Tensor& x, const char* what, const CtmcStructure& s) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == s.L, what, ": expected shape [B, L = ", s.L, "], got ", x.sizes());
  check_ctmc_index(x, what, {x.size(0), s.L}, s.lam.device());
  return x.size(0);
}

at::Tensor ctmc_transition_rows_cuda(const at::Tensor& x0, const at::Tensor& h, const at::Tensor& lam,
                                     const at::Tensor& perm, const at::Tensor& perm_inv) {
  TORCH_CHECK_VALUE(lam.is_cuda(), "lam: expected a CUDA tensor, got ", lam.device());
  c10::cuda::CUDAGuard guard(lam.device());
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, lam.device());
  const int64_t B = token_batch(x0, "x0", s);
  check_ctmc_float(h, "h", {B}, lam);
  at::Tensor x0c = x0.contiguous(), hc = h.contiguous();
  DeviceCheck check;
  check.add_structure(s);
  check.add_tokens(x0c, "x0", s.V);
  check.add_times(hc, "h");
  check.run();
  at::Tensor out = at::empty({B, s.L, s.V}, lam.options());
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "ctmc_transition_rows_cuda", [&] {
    check_launch(ctmc_transition_rows_cuda_launch<scalar_t>(device_args<scalar_t>(s, B), x0c.const_data_ptr<int64_t>(),
                                                            hc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                            current_stream(lam.device())),
                 "ctmc_transition_rows");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ctmc_transition_rows_backward_cuda(const at::Tensor& grad, const at::Tensor& x0,
                                                                      const at::Tensor& h, const at::Tensor& lam,
                                                                      const at::Tensor& perm,
                                                                      const at::Tensor& perm_inv) {
  TORCH_CHECK_VALUE(lam.is_cuda(), "lam: expected a CUDA tensor, got ", lam.device());
  c10::cuda::CUDAGuard guard(lam.device());
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, lam.device());
  const int64_t B = token_batch(x0, "x0", s);
  check_ctmc_float(h, "h", {B}, lam);
  check_ctmc_float(grad, "grad", {B, s.L, s.V}, lam);
  at::Tensor x0c = x0.contiguous(), hc = h.contiguous(), gc = grad.contiguous();
  DeviceCheck check;
  check.add_structure(s);
  check.add_tokens(x0c, "x0", s.V);
  check.add_times(hc, "h");
  check.run();
  at::Tensor dlam = at::zeros({s.L, s.V}, lam.options());
  at::Tensor dh_part = at::zeros({B, s.L}, lam.options());
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "ctmc_transition_rows_backward_cuda", [&] {
    check_launch(ctmc_transition_rows_backward_cuda_launch<scalar_t>(
                     device_args<scalar_t>(s, B), gc.const_data_ptr<scalar_t>(), x0c.const_data_ptr<int64_t>(),
                     hc.const_data_ptr<scalar_t>(), dlam.data_ptr<scalar_t>(), dh_part.data_ptr<scalar_t>(),
                     current_stream(lam.device())),
                 "ctmc_transition_rows_backward");
  });
  return {dlam, dh_part.sum(1)};
}

at::Tensor ctmc_rate_cols_cuda(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& perm,
                               const at::Tensor& perm_inv) {
  TORCH_CHECK_VALUE(lam.is_cuda(), "lam: expected a CUDA tensor, got ", lam.device());
  c10::cuda::CUDAGuard guard(lam.device());
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, lam.device());
  const int64_t B = token_batch(x, "x", s);
  at::Tensor xc = x.contiguous();
  DeviceCheck check;
  check.add_structure(s);
  check.add_tokens(xc, "x", s.V);
  check.run();
  at::Tensor out = at::empty({B, s.L, s.V}, lam.options());
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "ctmc_rate_cols_cuda", [&] {
    check_launch(ctmc_rate_cols_cuda_launch<scalar_t>(device_args<scalar_t>(s, B), xc.const_data_ptr<int64_t>(),
                                                      out.data_ptr<scalar_t>(), current_stream(lam.device())),
                 "ctmc_rate_cols");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> score_entropy_cuda(const at::Tensor& logscore, const at::Tensor& x_t,
                                                      const at::Tensor& x0, const at::Tensor& h,
                                                      const at::Tensor& sigma, const at::Tensor& lam,
                                                      const at::Tensor& perm, const at::Tensor& perm_inv,
                                                      bool with_grad) {
  TORCH_CHECK_VALUE(lam.is_cuda(), "lam: expected a CUDA tensor, got ", lam.device());
  c10::cuda::CUDAGuard guard(lam.device());
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, lam.device());
  const int64_t B = token_batch(x_t, "x_t", s);
  check_ctmc_index(x0, "x0", {B, s.L}, lam.device());
  check_ctmc_float(logscore, "logscore", {B, s.L, s.V}, lam);
  check_ctmc_float(h, "h", {B}, lam);
  check_ctmc_float(sigma, "sigma", {B}, lam);
  at::Tensor xtc = x_t.contiguous(), x0c = x0.contiguous(), hc = h.contiguous(), sc = sigma.contiguous();
  at::Tensor lsc = logscore.contiguous();
  DeviceCheck check;
  check.add_structure(s);
  check.add_tokens(xtc, "x_t", s.V);
  check.add_tokens(x0c, "x0", s.V);
  check.add_times(hc, "h");
  check.add_times(sc, "sigma");
  if (B * s.L > 0) {
    // Reachability where the weight σ·a_{k−1} is nonzero: rank(x_t) ≥ rank(x0), and h > 0 when they differ.
    // Clamped reads: bad ids or a bad perm are reported by the checks above, never read out of bounds here.
    at::Tensor k = s.perm.gather(1, xtc.clamp(0, s.V - 1).t()).t().clamp(0, s.V - 1);
    at::Tensor k0 = s.perm.gather(1, x0c.clamp(0, s.V - 1).t()).t().clamp(0, s.V - 1);
    at::Tensor lam_k = s.lam.gather(1, k.t()).t(), lam_prev = s.lam.gather(1, (k - 1).clamp_min(0).t()).t();
    at::Tensor rate = at::where(k.gt(0), lam_k - lam_prev, at::zeros_like(lam_k));
    at::Tensor weighted = sc.unsqueeze(1).mul(rate).gt(0);
    at::Tensor unreachable = k.lt(k0).logical_or(k.gt(k0).logical_and(hc.unsqueeze(1).mul(rate).eq(0)));
    check.add(weighted.logical_and(unreachable).any(),
              "x_t: a token cannot be reached from x0 in time h (its rank is below x0's, or h·a is 0): "
              "p(x_t | x0) = 0, so the score ratio is undefined; sample x_t from ctmc_transition_rows(x0, h, ...)");
  }
  check.run();
  at::Tensor loss_row = at::zeros({B, s.L}, lam.options());
  at::Tensor grad = with_grad ? at::empty({B, s.L, s.V}, lam.options()) : at::empty({0}, lam.options());
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "score_entropy_cuda", [&] {
    check_launch(score_entropy_cuda_launch<scalar_t>(
                     device_args<scalar_t>(s, B), lsc.const_data_ptr<scalar_t>(), xtc.const_data_ptr<int64_t>(),
                     x0c.const_data_ptr<int64_t>(), hc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
                     loss_row.data_ptr<scalar_t>(), with_grad ? grad.data_ptr<scalar_t>() : nullptr,
                     current_stream(lam.device())),
                 "score_entropy");
  });
  return {loss_row.sum(1), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CUDA, m) {
  m.impl("ctmc_transition_rows", &ctmc_transition_rows_cuda);
  m.impl("ctmc_transition_rows_backward", &ctmc_transition_rows_backward_cuda);
  m.impl("ctmc_rate_cols", &ctmc_rate_cols_cuda);
  m.impl("score_entropy", &score_entropy_cuda);
}

}  // namespace slimrate

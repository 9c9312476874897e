// CPU face of the CTMC ops (schemas in csrc/ops.cpp): the checks of ctmc_inputs.h (shapes, dtypes, then the data:
// token ids, permutations, Λ, times), contiguous copies, allocation, then the torch-free kernels of
// csrc/core/ctmc.h on raw pointers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "core/ctmc.h"
#include "cpu/core_face.h"
#include "ctmc_inputs.h"

namespace slimrate {
namespace {

template <class T>
core::CtmcStructure<T> core_structure(const CtmcStructure& s) {
  return {s.lam.const_data_ptr<T>(), s.perm.const_data_ptr<int64_t>(), s.perm_inv.const_data_ptr<int64_t>(), s.L,
          s.V};
}

at::Tensor ctmc_transition_rows_cpu(const at::Tensor& x0, const at::Tensor& h, const at::Tensor& lam,
                                    const at::Tensor& perm, const at::Tensor& perm_inv) {
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, at::kCPU);
  TORCH_CHECK_VALUE(x0.dim() == 2 && x0.size(1) == s.L, "x0: expected shape [B, L = ", s.L, "], got ", x0.sizes());
  const int64_t B = x0.size(0), L = s.L, V = s.V;
  check_ctmc_index(x0, "x0", {B, L}, at::kCPU);
  check_ctmc_float(h, "h", {B}, lam);
  at::Tensor x0c = x0.contiguous(), hc = h.contiguous();
  check_structure_cpu(s);
  check_tokens_cpu(x0c, "x0", V);
  check_times_cpu(hc, "h");
  at::Tensor out = at::empty({B, L, V}, lam.options());
  use_torch_threads();
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "ctmc_transition_rows", [&] {
    check_core(core::ctmc_transition_rows(core_structure<scalar_t>(s), x0c.const_data_ptr<int64_t>(),
                                          hc.const_data_ptr<scalar_t>(), B, out.data_ptr<scalar_t>()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ctmc_transition_rows_backward_cpu(const at::Tensor& grad, const at::Tensor& x0,
                                                                     const at::Tensor& h, const at::Tensor& lam,
                                                                     const at::Tensor& perm,
                                                                     const at::Tensor& perm_inv) {
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, at::kCPU);
  TORCH_CHECK_VALUE(x0.dim() == 2 && x0.size(1) == s.L, "x0: expected shape [B, L = ", s.L, "], got ", x0.sizes());
  const int64_t B = x0.size(0), L = s.L, V = s.V;
  check_ctmc_index(x0, "x0", {B, L}, at::kCPU);
  check_ctmc_float(h, "h", {B}, lam);
  check_ctmc_float(grad, "grad", {B, L, V}, lam);
  at::Tensor x0c = x0.contiguous(), hc = h.contiguous(), gc = grad.contiguous();
  check_structure_cpu(s);
  check_tokens_cpu(x0c, "x0", V);
  check_times_cpu(hc, "h");
  at::Tensor dlam = at::empty({L, V}, lam.options()), dh = at::empty({B}, lam.options());
  use_torch_threads();
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "ctmc_transition_rows_backward", [&] {
    check_core(core::ctmc_transition_rows_backward(core_structure<scalar_t>(s), gc.const_data_ptr<scalar_t>(),
                                                   x0c.const_data_ptr<int64_t>(), hc.const_data_ptr<scalar_t>(), B,
                                                   dlam.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>()));
  });
  return {dlam, dh};
}

at::Tensor ctmc_rate_cols_cpu(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& perm,
                              const at::Tensor& perm_inv) {
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, at::kCPU);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == s.L, "x: expected shape [B, L = ", s.L, "], got ", x.sizes());
  const int64_t B = x.size(0), L = s.L, V = s.V;
  check_ctmc_index(x, "x", {B, L}, at::kCPU);
  at::Tensor xc = x.contiguous();
  check_structure_cpu(s);
  check_tokens_cpu(xc, "x", V);
  at::Tensor out = at::empty({B, L, V}, lam.options());
  use_torch_threads();
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "ctmc_rate_cols", [&] {
    check_core(core::ctmc_rate_cols(core_structure<scalar_t>(s), xc.const_data_ptr<int64_t>(), B,
                                    out.data_ptr<scalar_t>()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> score_entropy_cpu(const at::Tensor& logscore, const at::Tensor& x_t,
                                                     const at::Tensor& x0, const at::Tensor& h,
                                                     const at::Tensor& sigma, const at::Tensor& lam,
                                                     const at::Tensor& perm, const at::Tensor& perm_inv,
                                                     bool with_grad) {
  CtmcStructure s = ctmc_structure(lam, perm, perm_inv, at::kCPU);
  TORCH_CHECK_VALUE(x_t.dim() == 2 && x_t.size(1) == s.L, "x_t: expected shape [B, L = ", s.L, "], got ",
                    x_t.sizes());
  const int64_t B = x_t.size(0), L = s.L, V = s.V;
  check_ctmc_index(x_t, "x_t", {B, L}, at::kCPU);
  check_ctmc_index(x0, "x0", {B, L}, at::kCPU);
  check_ctmc_float(logscore, "logscore", {B, L, V}, lam);
  check_ctmc_float(h, "h", {B}, lam);
  check_ctmc_float(sigma, "sigma", {B}, lam);
  at::Tensor xtc = x_t.contiguous(), x0c = x0.contiguous(), hc = h.contiguous(), sc = sigma.contiguous();
  at::Tensor lsc = logscore.contiguous();
  check_structure_cpu(s);
  check_tokens_cpu(xtc, "x_t", V);
  check_tokens_cpu(x0c, "x0", V);
  check_times_cpu(hc, "h");
  check_times_cpu(sc, "sigma");
  at::Tensor loss = at::empty({B}, lam.options());
  at::Tensor grad = with_grad ? at::empty({B, L, V}, lam.options()) : at::empty({0}, lam.options());
  int64_t i = -1;
  use_torch_threads();
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "score_entropy", [&] {
    check_core(core::score_entropy(core_structure<scalar_t>(s), lsc.const_data_ptr<scalar_t>(),
                                   xtc.const_data_ptr<int64_t>(), x0c.const_data_ptr<int64_t>(),
                                   hc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), B,
                                   loss.data_ptr<scalar_t>(), with_grad ? grad.data_ptr<scalar_t>() : nullptr, &i));
  });
  if (i >= 0) {
    const int64_t b = i / L, l = i % L;
    TORCH_CHECK_VALUE(false, "x_t: x_t[", b, ", ", l, "] = ", xtc[b][l].item<int64_t>(),
                      " cannot be reached from x0 = ", x0c[b][l].item<int64_t>(), " in time h = ", hc[b].item<double>(),
                      " (its rank is below x0's, or h·a underflows to 0): p(x_t | x0) = 0, so the score ratio is "
                      "undefined; sample x_t from ctmc_transition_rows(x0, h, ...)");
  }
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("ctmc_transition_rows", &ctmc_transition_rows_cpu);
  m.impl("ctmc_transition_rows_backward", &ctmc_transition_rows_backward_cpu);
  m.impl("ctmc_rate_cols", &ctmc_rate_cols_cpu);
  m.impl("score_entropy", &score_entropy_cpu);
}

}  // namespace slimrate

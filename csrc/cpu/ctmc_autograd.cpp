// Autograd of ctmc_transition_rows and score_entropy (schemas in csrc/ops.cpp), for every device: C++
// torch::autograd::Functions registered for the Autograd key.  Registering them from Python
// (torch.library.register_autograd) cost about 90 µs per forward + backward in its Python wrappers, 15–20% of a
// whole B = 32, L = 256, V = 27 step on this 2-core machine.  score_entropy's gradient in lam, h and sigma calls back
// into a composite op defined in Python (python/slimrate/ops/ctmc.py), only when one of them requires grad (matrix
// learning, not the hot score step).  The file sits in csrc/cpu because setup.py compiles that folder on every
// build.  ctmc_rate_cols keeps its Python autograd (python/slimrate/ops/ctmc.py): it is not on a training hot path.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace slimrate {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The device kernels below autograd, found once.
const auto& rows_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("slimrate::ctmc_transition_rows", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op;
}

const auto& rows_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("slimrate::ctmc_transition_rows_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&)>();
  return op;
}

const auto& score_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("slimrate::score_entropy", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op;
}

// score_entropy's backward in (lam, h, sigma): a composite of the row and column kernels' own backward, defined in
// Python (slimrate.ops.ctmc.score_entropy_rate_grads, registered as slimrate::score_entropy_rate_backward when
// slimrate.ops is imported); found on first use.
const auto& score_rate_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("slimrate::score_entropy_rate_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&)>();
  return op;
}

// Rows of exp(hQ); d/dlam and d/dh from the closed-form backward op.  Saves the inputs, not the [B, L, V] output.
class TransitionRows : public torch::autograd::Function<TransitionRows> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& h, const at::Tensor& lam,
                            const at::Tensor& perm, const at::Tensor& perm_inv) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x0, h, lam, perm, perm_inv});
    return rows_op().call(x0, h, lam, perm, perm_inv);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto [dlam, dh] = rows_backward_op().call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4]);
    return {at::Tensor(), ctx->needs_input_grad(1) ? dh : at::Tensor(),
            ctx->needs_input_grad(2) ? dlam : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The score entropy and its gradient per unit loss come from one forward pass; backward scales the latter.  The
// inputs are saved only when h, sigma or lam requires grad (training Q): the score-learning step saves one tensor.
class ScoreEntropy : public torch::autograd::Function<ScoreEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logscore, const at::Tensor& x_t,
                               const at::Tensor& x0, const at::Tensor& h, const at::Tensor& sigma,
                               const at::Tensor& lam, const at::Tensor& perm, const at::Tensor& perm_inv,
                               bool with_grad) {
    const bool rates = h.requires_grad() || sigma.requires_grad() || lam.requires_grad();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = score_op().call(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad);
    ctx->saved_data["with_grad"] = with_grad;
    if (rates) {
      ctx->save_for_backward({grad, logscore, x_t, x0, h, sigma, lam, perm, perm_inv});
    } else {
      ctx->save_for_backward({grad});
    }
    ctx->mark_non_differentiable({grad});
    return {loss, grad};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    variable_list out(9);
    if (ctx->needs_input_grad(0)) {
      TORCH_CHECK(ctx->saved_data["with_grad"].toBool(), "score_entropy: the op ran with with_grad=False, so it "
                  "kept no gradient; call slimrate.ops.score_entropy, which sets it when logscore requires grad");
      out[0] = grads[0].view({-1, 1, 1}) * s[0];
    }
    if (s.size() > 1) {
      auto [dlam, dh, dsigma] =
          score_rate_backward_op().call(grads[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]);
      if (ctx->needs_input_grad(3)) out[3] = dh;
      if (ctx->needs_input_grad(4)) out[4] = dsigma;
      if (ctx->needs_input_grad(5)) out[5] = dlam;
    }
    return out;
  }
};

at::Tensor ctmc_transition_rows_autograd(const at::Tensor& x0, const at::Tensor& h, const at::Tensor& lam,
                                         const at::Tensor& perm, const at::Tensor& perm_inv) {
  return TransitionRows::apply(x0, h, lam, perm, perm_inv);
}

std::tuple<at::Tensor, at::Tensor> score_entropy_autograd(const at::Tensor& logscore, const at::Tensor& x_t,
                                                          const at::Tensor& x0, const at::Tensor& h,
                                                          const at::Tensor& sigma, const at::Tensor& lam,
                                                          const at::Tensor& perm, const at::Tensor& perm_inv,
                                                          bool with_grad) {
  variable_list out = ScoreEntropy::apply(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, with_grad);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, Autograd, m) {
  m.impl("ctmc_transition_rows", &ctmc_transition_rows_autograd);
  m.impl("score_entropy", &score_entropy_autograd);
}

}  // namespace slimrate

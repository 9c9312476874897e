// Checkers of the rate kernels (core/rate.h): cases "rate_stats" and "rate_grad_" from tools/core_cases.py.
#include <stdexcept>
#include <string>

#include "core/rate.h"
#include "tests/check.h"

namespace slimrate::tests {

// Inputs: tensors.<i>. Outputs: numel, sum_abs, sum_sq.
void check_rate_stats(const Case& c, Verdict& v) {
  FloatTensors x(c, "tensors");
  double out[3];
  v.expect_ok(core::rate_stats(x.pointers().data(), x.numels.data(), x.formats.data(), x.numels.size(), out));
  v.compare(c, "numel", {out[0]});
  v.compare(c, "sum_abs", {out[1]});
  v.compare(c, "sum_sq", {out[2]});
}

// Inputs: params.<i>, grads.<i>, lam, nu, eps. Outputs: r and grads.<i> after the in-place update.
void check_rate_grad(const Case& c, Verdict& v) {
  FloatTensors params(c, "params"), grads(c, "grads");
  if (grads.numels != params.numels || grads.formats != params.formats)
    throw std::runtime_error("grads.<i>: expected the sizes and dtypes of params.<i>");
  double r = 0.0;
  v.expect_ok(core::rate_grad(params.pointers().data(), grads.mutable_pointers().data(), params.numels.data(),
                              params.formats.data(), params.numels.size(), c.scalar("lam"), c.scalar("nu"),
                              c.scalar("eps"), &r));
  v.compare(c, "r", {r});
  for (size_t i = 0; i < grads.numels.size(); ++i) v.compare(c, "grads." + std::to_string(i), grads.values(i));
}

}  // namespace slimrate::tests

// Checkers of the CTMC kernels (core/ctmc.h): cases "ctmc_transition_rows", "ctmc_transition_rows_backward",
// "ctmc_rate_cols" and "score_entropy" from tools/core_cases.py, in lam's dtype (float32 or float64).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "core/ctmc.h"
#include "tests/check.h"

namespace slimrate::tests {
namespace {

template <class T>
const T* data_as(const Case& c, const std::string& name, DType dtype) {
  const Array& a = c.get(name);
  if (a.dtype != dtype) throw std::runtime_error("'" + name + "': unexpected dtype");
  return reinterpret_cast<const T*>(a.bytes.data());
}

template <class T>
std::vector<double> to_doubles(const std::vector<T>& v) {
  return {v.begin(), v.end()};
}

// Calls check.template operator()<T>(structure, B) with T = lam's dtype; B is the batch of the case's
// `batch_source` array [B, L].
template <class Check>
void with_structure(const Case& c, const std::string& batch_source, const Check& check) {
  const Array& lam = c.get("lam");
  if (lam.shape.size() != 2) throw std::runtime_error("lam: expected [L, V]");
  const int64_t L = lam.shape[0], V = lam.shape[1], B = c.get(batch_source).shape.at(0);
  auto run = [&](auto tag, DType dtype) {
    using T = decltype(tag);
    core::CtmcStructure<T> s{data_as<T>(c, "lam", dtype), data_as<int64_t>(c, "perm", DType::i64),
                             data_as<int64_t>(c, "perm_inv", DType::i64), L, V};
    check(s, B);
  };
  if (lam.dtype == DType::f32) run(float{}, DType::f32);
  else run(double{}, DType::f64);
}

template <class T>
DType dtype_of() {
  return sizeof(T) == 4 ? DType::f32 : DType::f64;
}

}  // namespace

// Inputs: lam, perm, perm_inv [L, V], x0 [B, L], h [B]. Output: rows [B, L, V].
void check_ctmc_transition_rows(const Case& c, Verdict& v) {
  with_structure(c, "x0", [&](const auto& s, int64_t B) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(s.lam)>>;
    std::vector<T> out(B * s.L * s.V);
    v.expect_ok(core::ctmc_transition_rows(s, data_as<int64_t>(c, "x0", DType::i64),
                                           data_as<T>(c, "h", dtype_of<T>()), B, out.data()));
    v.compare(c, "rows", to_doubles(out));
  });
}

// Inputs: lam, perm, perm_inv, x0, h, grad [B, L, V]. Outputs: dlam [L, V], dh [B].
void check_ctmc_transition_rows_backward(const Case& c, Verdict& v) {
  with_structure(c, "x0", [&](const auto& s, int64_t B) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(s.lam)>>;
    std::vector<T> dlam(s.L * s.V), dh(B);
    v.expect_ok(core::ctmc_transition_rows_backward(s, data_as<T>(c, "grad", dtype_of<T>()),
                                                    data_as<int64_t>(c, "x0", DType::i64),
                                                    data_as<T>(c, "h", dtype_of<T>()), B, dlam.data(), dh.data()));
    v.compare(c, "dlam", to_doubles(dlam));
    v.compare(c, "dh", to_doubles(dh));
  });
}

// Inputs: lam, perm, perm_inv, x [B, L]. Output: cols [B, L, V].
void check_ctmc_rate_cols(const Case& c, Verdict& v) {
  with_structure(c, "x", [&](const auto& s, int64_t B) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(s.lam)>>;
    std::vector<T> out(B * s.L * s.V);
    v.expect_ok(core::ctmc_rate_cols(s, data_as<int64_t>(c, "x", DType::i64), B, out.data()));
    v.compare(c, "cols", to_doubles(out));
  });
}

// Inputs: lam, perm, perm_inv, logscore [B, L, V], x_t, x0 [B, L], h, sigma [B]. Outputs: unreachable (the first
// flat row whose x_t cannot be reached, or −1) and, when the case expects them, loss [B] and grad [B, L, V].
void check_score_entropy(const Case& c, Verdict& v) {
  with_structure(c, "x_t", [&](const auto& s, int64_t B) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(s.lam)>>;
    std::vector<T> loss(B), grad(B * s.L * s.V);
    int64_t unreachable = -1;
    v.expect_ok(core::score_entropy(s, data_as<T>(c, "logscore", dtype_of<T>()),
                                    data_as<int64_t>(c, "x_t", DType::i64), data_as<int64_t>(c, "x0", DType::i64),
                                    data_as<T>(c, "h", dtype_of<T>()), data_as<T>(c, "sigma", dtype_of<T>()), B,
                                    loss.data(), grad.data(), &unreachable));
    v.compare(c, "unreachable", {static_cast<double>(unreachable)});
    if (c.find("expected.loss") == nullptr) return;
    v.compare(c, "loss", to_doubles(loss));
    v.compare(c, "grad", to_doubles(grad));
    // Without the gradient (its own instantiation of the row loop): the same loss.
    v.expect_ok(core::score_entropy<T>(s, data_as<T>(c, "logscore", dtype_of<T>()),
                                       data_as<int64_t>(c, "x_t", DType::i64), data_as<int64_t>(c, "x0", DType::i64),
                                       data_as<T>(c, "h", dtype_of<T>()), data_as<T>(c, "sigma", dtype_of<T>()), B,
                                       loss.data(), nullptr, &unreachable));
    v.compare(c, "loss", to_doubles(loss));
  });
}

}  // namespace slimrate::tests

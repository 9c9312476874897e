// What a family's checker (check_<family>.cpp) uses: the Verdict it fills while comparing the core's outputs with
// a case's expected ones, and the case's float tensors as the core's raw pointer lists.
#pragma once
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "core/float_format.h"
#include "core/status.h"
#include "tests/case_file.h"

namespace slimrate::tests {

// The outcome of one case. compare() records every output (so runs at two thread counts can be compared) and a
// failure line for each output outside its tolerance.
struct Verdict {
  bool ok = true;
  std::string failures;
  double worst = 0.0;  // the largest error/tolerance ratio over the outputs within tolerance
  std::vector<std::pair<std::string, std::vector<double>>> outputs;

  void fail(const std::string& what) {
    ok = false;
    failures += (failures.empty() ? "" : "; ") + what;
  }

  void expect_ok(core::Status status) {
    if (status != core::Status::ok) fail(std::string("status: ") + core::describe(status));
  }

  // status against "expected.status" (a core::Status code); a refusal must come with its error text.
  void compare_status(const Case& c, core::Status status, const std::string& error) {
    compare(c, "status", {static_cast<double>(status)});
    if (status != core::Status::ok && error.empty()) fail(std::string("no error text with ") + core::describe(status));
  }

  // got against "expected.<output>" within "tol.<output>": ‖got − expected‖ / ‖expected‖ ≤ tol.
  void compare(const Case& c, const std::string& output, std::vector<double> got) {
    std::vector<double> want = c.get("expected." + output).values();
    double tol = c.scalar("tol." + output);
    outputs.emplace_back(output, got);
    if (got.size() != want.size()) {
      fail(output + ": " + std::to_string(got.size()) + " values, expected " + std::to_string(want.size()));
      return;
    }
    double diff2 = 0.0, want2 = 0.0, max_abs = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      double d = std::fabs(got[i] - want[i]);
      diff2 += d * d;
      want2 += want[i] * want[i];
      if (!(d <= max_abs)) {  // also takes a NaN
        max_abs = d;
        at = i;
      }
    }
    double err = std::sqrt(diff2) / std::max(std::sqrt(want2), 1e-300);
    if (err <= tol) {
      worst = std::max(worst, tol > 0 ? err / tol : 0.0);
      return;
    }
    char line[256];
    std::snprintf(line, sizeof line, "%s: rel err %.3g > tol %.3g, max abs err %.3g at flat index %zu",
                  output.c_str(), err, tol, max_abs, at);
    fail(line);
  }
};

// A case's float tensors "<argument>.0", "<argument>.1", …: copies the core may write, and its pointer lists.
struct FloatTensors {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<int64_t> numels;
  std::vector<core::FloatFormat> formats;

  FloatTensors(const Case& c, const std::string& argument) {
    for (const Array* a : c.list(argument)) {
      bytes.push_back(a->bytes);
      numels.push_back(a->numel());
      formats.push_back(float_format(*a));
    }
  }

  std::vector<const void*> pointers() const {
    std::vector<const void*> out;
    for (const auto& b : bytes) out.push_back(b.data());
    return out;
  }

  std::vector<void*> mutable_pointers() {
    std::vector<void*> out;
    for (auto& b : bytes) out.push_back(b.data());
    return out;
  }

  // Tensor i's elements as doubles.
  std::vector<double> values(size_t i) const {
    Array a{"", dtype_of(formats[i]), {numels[i]}, bytes[i]};
    return a.values();
  }

  static core::FloatFormat float_format(const Array& a) {
    switch (a.dtype) {
      case DType::f32: return core::FloatFormat::f32;
      case DType::f64: return core::FloatFormat::f64;
      case DType::bf16: return core::FloatFormat::bf16;
      case DType::f16: return core::FloatFormat::f16;
      default: throw std::runtime_error("'" + a.name + "': expected a float dtype");
    }
  }

  static DType dtype_of(core::FloatFormat format) {
    static constexpr DType kDTypes[] = {DType::f32, DType::f64, DType::bf16, DType::f16};
    return kDTypes[static_cast<int>(format)];
  }
};

}  // namespace slimrate::tests

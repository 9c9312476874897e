// Checkers of the entropy coders (core/entropy.h): cases "eg_encode", "eg_decode", "rans_encode" and
// "rans_decode" from tools/core_cases.py. Bytes and symbols are compared exactly (tolerance 0): the streams the
// host's reference wrote must be the bytes every architecture writes and decodes.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/entropy.h"
#include "tests/check.h"

namespace slimrate::tests {
namespace {

const Array& typed(const Case& c, const std::string& name, DType dtype) {
  const Array& a = c.get(name);
  if (a.dtype != dtype) throw std::runtime_error("'" + name + "': unexpected dtype");
  return a;
}

template <class T>
std::vector<double> to_doubles(const std::vector<T>& v) {
  return {v.begin(), v.end()};
}

struct EgArgs {
  int k;
  bool is_signed;
  explicit EgArgs(const Case& c) : k(static_cast<int>(c.scalar("k"))), is_signed(c.scalar("signed") != 0) {}
};

}  // namespace

// Inputs: symbols (int32), k, signed. Outputs: status and, when ok, bits, bytes and symbols (the round trip: the
// core's own bytes decoded by the core).
void check_eg_encode(const Case& c, Verdict& v) {
  const Array& symbols = typed(c, "symbols", DType::i32);
  const EgArgs eg(c);
  const int32_t* s = symbols.data<int32_t>();
  const int64_t n = symbols.numel();
  core::EgPlan plan;
  std::string error;
  const core::Status status = core::eg_plan(s, n, eg.k, eg.is_signed, &plan, &error);
  v.compare_status(c, status, error);
  if (status != core::Status::ok) return;
  v.compare(c, "bits", {static_cast<double>(plan.bits())});
  std::vector<uint8_t> bytes(plan.bytes());
  v.expect_ok(core::eg_encode(s, n, eg.k, eg.is_signed, plan, bytes.data()));
  v.compare(c, "bytes", to_doubles(bytes));
  std::vector<int32_t> decoded(n);
  v.expect_ok(core::eg_decode(bytes.data(), plan.bytes(), n, eg.k, eg.is_signed, decoded.data(), &error));
  v.compare(c, "symbols", to_doubles(decoded));
}

// Inputs: buf (uint8, written on the host), count, k, signed. Outputs: status and, when ok, symbols.
void check_eg_decode(const Case& c, Verdict& v) {
  const Array& buf = typed(c, "buf", DType::u8);
  const EgArgs eg(c);
  const int64_t count = static_cast<int64_t>(c.scalar("count"));
  if (count > 8 * buf.numel()) throw std::runtime_error("count: more codes than buf has bits (a face checks this)");
  std::vector<int32_t> out(count);
  std::string error;
  const core::Status status =
      core::eg_decode(buf.data<uint8_t>(), buf.numel(), count, eg.k, eg.is_signed, out.data(), &error);
  v.compare_status(c, status, error);
  if (status == core::Status::ok) v.compare(c, "symbols", to_doubles(out));
}

// Inputs: symbols (int32). Outputs: bytes and symbols (the round trip).
void check_rans_encode(const Case& c, Verdict& v) {
  const Array& symbols = typed(c, "symbols", DType::i32);
  const int64_t n = symbols.numel();
  std::vector<uint8_t> bytes;
  v.expect_ok(core::rans_encode(symbols.data<int32_t>(), n, &bytes));
  v.compare(c, "bytes", to_doubles(bytes));
  std::vector<int32_t> decoded(n);
  std::string error;
  const int64_t size = static_cast<int64_t>(bytes.size());
  v.expect_ok(core::rans_check(bytes.data(), size, n, &error));
  v.expect_ok(core::rans_decode(bytes.data(), size, n, decoded.data(), &error));
  v.compare(c, "symbols", to_doubles(decoded));
}

// Inputs: buf (uint8, written on the host), count. Outputs: status (rans_check's, then rans_decode's) and, when
// ok, symbols.
void check_rans_decode(const Case& c, Verdict& v) {
  const Array& buf = typed(c, "buf", DType::u8);
  const int64_t count = static_cast<int64_t>(c.scalar("count"));
  std::string error;
  core::Status status = core::rans_check(buf.data<uint8_t>(), buf.numel(), count, &error);
  std::vector<int32_t> out;
  if (status == core::Status::ok) {
    out.resize(count);
    status = core::rans_decode(buf.data<uint8_t>(), buf.numel(), count, out.data(), &error);
  }
  v.compare_status(c, status, error);
  if (status == core::Status::ok) v.compare(c, "symbols", to_doubles(out));
}

}  // namespace slimrate::tests

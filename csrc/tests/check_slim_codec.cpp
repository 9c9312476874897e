// Checkers of the chunked tensor codec (core/slim_codec.h): cases "slim_encode" and "slim_decode" from
// tools/core_cases.py. Payloads, layouts and decoded values are compared exactly (tolerance 0).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/slim_codec.h"
#include "tests/check.h"

namespace slimrate::tests {
namespace {

// "coder": 0 = "eg", 1 = "eg-signed", 2 = "rans" (core::SlimCoder's order).
core::SlimCoder coder_of(const Case& c) {
  const double code = c.scalar("coder");
  if (code != 0 && code != 1 && code != 2) throw std::runtime_error("coder: expected 0, 1 or 2");
  return static_cast<core::SlimCoder>(code);
}

// Decodes payload into chunks.numel values of `format`, as doubles; the status and error of the first refusal.
std::vector<double> decode(const uint8_t* payload, const int64_t* layout, core::SlimCoder coder,
                           const core::SlimChunks& chunks, double step, core::FloatFormat format,
                           core::Status* status, std::string* error) {
  core::SlimDecodePlan plan;
  *status = core::slim_decode_plan(payload, layout, coder, chunks, &plan, error);
  if (*status != core::Status::ok) return {};
  Array out{"", FloatTensors::dtype_of(format), {chunks.numel}, {}};
  out.bytes.resize(out.numel() * itemsize(out.dtype));
  *status = core::slim_decode(payload, plan, coder, chunks, step, format, out.bytes.data(), error);
  return out.values();
}

}  // namespace

// Inputs: x (float, flat), step, coder, chunk_numel. Outputs: status and, when ok, payload, layout and x (the
// round trip: the core's own payload decoded by the core into x's dtype).
void check_slim_encode(const Case& c, Verdict& v) {
  const Array& x = c.get("x");
  const core::FloatFormat format = FloatTensors::float_format(x);
  const double step = c.scalar("step");
  const core::SlimCoder coder = coder_of(c);
  const core::SlimChunks chunks(x.numel(), static_cast<int64_t>(c.scalar("chunk_numel")));
  core::SlimEncoding enc;
  std::string error;
  core::Status status = core::slim_encode_plan(x.bytes.data(), format, step, coder, chunks, &enc, &error);
  v.compare_status(c, status, error);
  if (status != core::Status::ok) return;
  std::vector<uint8_t> payload(enc.payload_bytes);
  v.expect_ok(core::slim_encode_write(x.bytes.data(), format, step, coder, chunks, enc, payload.data()));
  v.compare(c, "payload", {payload.begin(), payload.end()});
  v.compare(c, "layout", {enc.layout.begin(), enc.layout.end()});
  std::vector<double> decoded = decode(payload.data(), enc.layout.data(), coder, chunks, step, format, &status, &error);
  v.expect_ok(status);
  v.compare(c, "x", decoded);
}

// Inputs: payload (uint8, written on the host), layout (int64, consistent with the payload's size), numel, step,
// coder, chunk_numel, format (core::FloatFormat's code). Outputs: status and, when ok, x.
void check_slim_decode(const Case& c, Verdict& v) {
  const Array& payload = c.get("payload");
  const Array& layout = c.get("layout");
  if (payload.dtype != DType::u8 || layout.dtype != DType::i64) throw std::runtime_error("expected uint8, int64");
  const core::SlimChunks chunks(static_cast<int64_t>(c.scalar("numel")),
                                static_cast<int64_t>(c.scalar("chunk_numel")));
  if (layout.numel() != 2 + chunks.count) throw std::runtime_error("layout: expected 2 + the chunk count entries");
  const double format = c.scalar("format");
  if (format != 0 && format != 1 && format != 2 && format != 3) throw std::runtime_error("format: expected 0-3");
  core::Status status;
  std::string error;
  std::vector<double> x = decode(payload.data<uint8_t>(), layout.data<int64_t>(), coder_of(c), chunks,
                                 c.scalar("step"), static_cast<core::FloatFormat>(format), &status, &error);
  v.compare_status(c, status, error);
  if (status == core::Status::ok) v.compare(c, "x", x);
}

}  // namespace slimrate::tests

// CPU face of slim_encode / slim_decode (schemas in csrc/ops.cpp; format in docs/slim-format.md): the checks of
// coding_inputs.h, allocation from the core's first pass, then the torch-free codec of csrc/core/slim_codec.h on
// raw pointers. What it refuses in the data (a value without a symbol, a corrupt payload) is raised with its
// words as ValueError (TORCH_CHECK_VALUE).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "coding_inputs.h"
#include "core/slim_codec.h"
#include "cpu/core_face.h"
#include "cpu/float_formats.h"

namespace slimrate {
namespace {

std::tuple<at::Tensor, at::Tensor> slim_encode_cpu(const at::Tensor& x_in, double step, c10::string_view coder_name,
                                                   int64_t chunk_numel) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "x: expected a CPU tensor, got ", x_in.device());
  TORCH_CHECK_TYPE(is_slim_float(x_in.scalar_type()), "x: expected float32, float64, bfloat16 or float16, got ",
                   x_in.scalar_type());
  check_slim_scalars(step, chunk_numel);
  const core::SlimCoder coder = slim_coder(coder_name);
  const at::Tensor x = x_in.contiguous();  // a copy in x's own dtype only for a strided view
  const core::SlimChunks chunks(x.numel(), chunk_numel);
  const core::FloatFormat format = format_of(x.scalar_type());
  core::SlimEncoding enc;
  std::string error;
  use_torch_threads();
  check_core(core::slim_encode_plan(x.const_data_ptr(), format, step, coder, chunks, &enc, &error), error);
  at::Tensor payload = at::empty({enc.payload_bytes}, at::dtype(at::kByte));
  check_core(core::slim_encode_write(x.const_data_ptr(), format, step, coder, chunks, enc,
                                     payload.mutable_data_ptr<uint8_t>()));
  return {payload, at::tensor(enc.layout, at::dtype(at::kLong))};
}

at::Tensor slim_decode_cpu(const at::Tensor& payload_in, const at::Tensor& layout_in, int64_t numel, double step,
                           c10::string_view coder_name, int64_t chunk_numel, at::ScalarType dtype) {
  const at::Tensor payload = checked_1d(payload_in, "payload", at::kByte);
  const at::Tensor layout = checked_1d(layout_in, "layout", at::kLong);
  TORCH_CHECK_VALUE(numel >= 0, "numel: expected an int >= 0, got ", numel);
  check_slim_scalars(step, chunk_numel);
  TORCH_CHECK_TYPE(is_slim_float(dtype), "dtype: expected float32, float64, bfloat16 or float16, got ", dtype);
  const core::SlimCoder coder = slim_coder(coder_name);
  const core::SlimChunks chunks(numel, chunk_numel);
  check_slim_layout(layout, payload.numel(), chunks, coder);
  const uint8_t* bytes = payload.const_data_ptr<uint8_t>();
  core::SlimDecodePlan plan;
  std::string error;
  check_core(core::slim_decode_plan(bytes, layout.const_data_ptr<int64_t>(), coder, chunks, &plan, &error), error);
  // numel: the caller's, checked against the layout and (eg, eg-signed: ≥ 1 bit per symbol; rans: each chunk's
  // header and stream length) against the payload; a rANS chunk of one repeated symbol may still state any count
  const int64_t itemsize = static_cast<int64_t>(c10::elementSize(dtype));
  const core::FloatFormat format = format_of(dtype);
  TORCH_CHECK_VALUE(numel <= INT64_MAX / itemsize, "numel: ", numel, " elements of ", core::format_name(format),
                    " exceed the largest tensor");
  at::Tensor out = at::empty({numel}, at::dtype(dtype));
  use_torch_threads();
  check_core(core::slim_decode(bytes, plan, coder, chunks, step, format, out.mutable_data_ptr(), &error), error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("slim_encode", &slim_encode_cpu);
  m.impl("slim_decode", &slim_decode_cpu);
}

}  // namespace slimrate

// CPU face of the entropy coders (schemas in csrc/ops.cpp): the checks of coding_inputs.h, allocation, then the
// torch-free coders of csrc/core/entropy.h on raw pointers. What they refuse in the data (a symbol without a code,
// a corrupt stream) is raised with their words as ValueError (TORCH_CHECK_VALUE).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "coding_inputs.h"
#include "core/entropy.h"
#include "cpu/core_face.h"
#include "kernels/entropy_eg.h"

namespace slimrate {
namespace {

// The most int32 symbols whose byte size an int64 holds (at::empty fails beyond it): a header of one repeated
// symbol may state any count in a few bytes.
constexpr int64_t kMaxInt32Symbols = INT64_MAX / 4;

void check_order(int64_t k) {
  TORCH_CHECK_VALUE(k >= 0 && k <= kEgMaxOrder, "k: expected an order in [0, ", kEgMaxOrder, "], got ", k);
}

// The plan of eg_encode(symbols, k, is_signed); raises naming the first symbol that cannot be coded.
core::EgPlan eg_plan(const at::Tensor& symbols, int64_t k, bool is_signed) {
  core::EgPlan plan;
  std::string error;
  check_core(core::eg_plan(symbols.const_data_ptr<int32_t>(), symbols.numel(), static_cast<int>(k), is_signed, &plan,
                           &error),
             error);
  return plan;
}

at::Tensor eg_code_length_cpu(const at::Tensor& symbols_in, int64_t k, bool is_signed) {
  at::Tensor symbols = checked_1d(symbols_in, "symbols", at::kInt);
  check_order(k);
  use_torch_threads();
  return at::scalar_tensor(eg_plan(symbols, k, is_signed).bits(), at::dtype(at::kLong));
}

at::Tensor eg_encode_cpu(const at::Tensor& symbols_in, int64_t k, bool is_signed) {
  at::Tensor symbols = checked_1d(symbols_in, "symbols", at::kInt);
  check_order(k);
  use_torch_threads();
  const core::EgPlan plan = eg_plan(symbols, k, is_signed);
  at::Tensor out = at::empty({plan.bytes()}, at::dtype(at::kByte));
  check_core(core::eg_encode(symbols.const_data_ptr<int32_t>(), symbols.numel(), static_cast<int>(k), is_signed, plan,
                             out.mutable_data_ptr<uint8_t>()));
  return out;
}

at::Tensor eg_decode_cpu(const at::Tensor& buf_in, int64_t count, int64_t k, bool is_signed) {
  at::Tensor buf = checked_1d(buf_in, "buf", at::kByte);
  check_order(k);
  TORCH_CHECK_VALUE(count >= 0, "count: expected >= 0, got ", count);
  // Every code is at least one bit: checked before the output is allocated.
  TORCH_CHECK_VALUE(count <= 8 * buf.numel(), "buf: ", buf.numel(), " bytes cannot hold ", count,
                    " exp-Golomb codes (truncated input or wrong count)");
  at::Tensor out = at::empty({count}, at::dtype(at::kInt));
  std::string error;
  check_core(core::eg_decode(buf.const_data_ptr<uint8_t>(), buf.numel(), count, static_cast<int>(k), is_signed,
                             out.mutable_data_ptr<int32_t>(), &error),
             error);
  return out;
}

at::Tensor rans_encode_cpu(const at::Tensor& symbols_in) {
  at::Tensor symbols = checked_1d(symbols_in, "symbols", at::kInt);
  std::vector<uint8_t> bytes;
  check_core(core::rans_encode(symbols.const_data_ptr<int32_t>(), symbols.numel(), &bytes));
  at::Tensor out = at::empty({static_cast<int64_t>(bytes.size())}, at::dtype(at::kByte));
  std::memcpy(out.mutable_data_ptr<uint8_t>(), bytes.data(), bytes.size());
  return out;
}

at::Tensor rans_decode_cpu(const at::Tensor& buf_in, int64_t count) {
  at::Tensor buf = checked_1d(buf_in, "buf", at::kByte);
  TORCH_CHECK_VALUE(count >= 0, "count: expected >= 0, got ", count);
  // The whole header and the stream's length are checked before `count` symbols are allocated.
  const uint8_t* b = buf.const_data_ptr<uint8_t>();
  std::string error;
  check_core(core::rans_check(b, buf.numel(), count, &error), error);
  TORCH_CHECK_VALUE(count <= kMaxInt32Symbols, "count: ", count, " int32 symbols exceed the largest tensor (",
                    kMaxInt32Symbols, ")");
  at::Tensor out = at::empty({count}, at::dtype(at::kInt));
  check_core(core::rans_decode(b, buf.numel(), count, out.mutable_data_ptr<int32_t>(), &error), error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("eg_code_length", &eg_code_length_cpu);
  m.impl("eg_encode", &eg_encode_cpu);
  m.impl("eg_decode", &eg_decode_cpu);
  m.impl("rans_encode", &rans_encode_cpu);
  m.impl("rans_decode", &rans_decode_cpu);
}

}  // namespace slimrate

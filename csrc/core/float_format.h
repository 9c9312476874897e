// The storage format of a float tensor handed to the core as a raw pointer, and the kernels/portable.h format
// type that reads it.
#pragma once
#include <cstdint>

#include "kernels/portable.h"

namespace slimrate::core {

enum class FloatFormat : uint8_t { f32, f64, bf16, f16 };

// The format's name as Python writes its dtype ("float16"), for messages.
inline const char* format_name(FloatFormat format) {
  static constexpr const char* kNames[] = {"float32", "float64", "bfloat16", "float16"};
  return kNames[static_cast<int>(format)];
}

// Calls fn with the format tag (F32, F64, BF16, F16) of `format`.
template <class Fn>
auto with_format(FloatFormat format, Fn&& fn) {
  switch (format) {
    case FloatFormat::f32: return fn(F32{});
    case FloatFormat::f64: return fn(F64{});
    case FloatFormat::bf16: return fn(BF16{});
    default: return fn(F16{});
  }
}

// with_format for kernels that store no float64 (sparse values, NF4 weights): F32, BF16, else F16.
template <class Fn>
auto with_f32_f16_format(FloatFormat format, Fn&& fn) {
  switch (format) {
    case FloatFormat::f32: return fn(F32{});
    case FloatFormat::bf16: return fn(BF16{});
    default: return fn(F16{});
  }
}

}  // namespace slimrate::core

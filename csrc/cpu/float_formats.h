// The storage formats of kernels/portable.h picked from a tensor's dtype: the ATen side of the CPU kernels that
// read float32, float64, bfloat16 and float16 tensors through one template.
#pragma once
#include <ATen/ATen.h>

#include <utility>

#include "core/float_format.h"
#include "kernels/portable.h"

namespace slimrate {

// The core's format of dtype (checked by the caller to be one of the four).
inline core::FloatFormat format_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return core::FloatFormat::f32;
    case at::kDouble: return core::FloatFormat::f64;
    case at::kBFloat16: return core::FloatFormat::bf16;
    default: return core::FloatFormat::f16;
  }
}

// Calls fn with the storage format tag of dtype (checked by the caller to be one of the four).
template <class Fn>
auto with_format(at::ScalarType st, Fn&& fn) {
  return core::with_format(format_of(st), std::forward<Fn>(fn));
}

template <class Fmt>
const typename Fmt::storage* data_of(const at::Tensor& t) {
  return reinterpret_cast<const typename Fmt::storage*>(t.const_data_ptr());
}

}  // namespace slimrate

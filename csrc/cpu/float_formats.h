// The storage formats of kernels/portable.h picked from a tensor's dtype: the ATen side of the CPU kernels that
// read float32, float64, bfloat16 and float16 tensors through one template.
#pragma once
#include <ATen/ATen.h>

#include "kernels/portable.h"

namespace slimrate {

// Calls fn with the storage format tag of dtype (checked by the caller to be one of the four).
template <class Fn>
auto with_format(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kFloat: return fn(F32{});
    case at::kDouble: return fn(F64{});
    case at::kBFloat16: return fn(BF16{});
    default: return fn(F16{});
  }
}

template <class Fmt>
const typename Fmt::storage* data_of(const at::Tensor& t) {
  return reinterpret_cast<const typename Fmt::storage*>(t.const_data_ptr());
}

}  // namespace slimrate

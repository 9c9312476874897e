// Bodies of the NF4 quantize / dequantize kernels of core/nf4.h: loops written for the auto-vectoriser, cloned per
// x86 ISA (core/arch.h); decoding in core/nf4_decode.h.
#include "core/nf4.h"

#include <algorithm>
#include <cmath>

#include "core/arch.h"
#include "core/nf4_decode.h"
#include "core/parallel.h"
#include "kernels/nf4.h"

namespace slimrate::core {
namespace {

// Blocks [b_lo, b_hi) of w (n weights): absmax and packed codes.  A full block is scaled by w·(1/absmax), the
// last partial block by w/absmax (bitsandbytes' portable kernel does both), the floor 1e-38 keeps 0/0 away.
template <class Fmt>
SLIMRATE_CPU_CLONES void quantize_blocks(const typename Fmt::storage* w, int64_t n, int64_t bs, int64_t b_lo,
                                         int64_t b_hi, uint8_t* packed, float* absmax) {
  for (int64_t b = b_lo; b < b_hi; ++b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    const auto* wb = w + start;
    float am = 0.0f;
#pragma omp simd reduction(max : am)
    for (int64_t i = 0; i < len; ++i) am = std::max(am, std::fabs(Fmt::load(wb[i])));
    absmax[b] = am;
    const float div = std::max(am, kNF4AbsmaxFloor);
    const float inv = 1.0f / div;
    uint8_t* out = packed + start / 2;
    const int64_t pairs = len / 2;
    if (len == bs) {
#pragma omp simd
      for (int64_t j = 0; j < pairs; ++j) {
        const uint32_t h = nf4_index(nf4_clamp(Fmt::load(wb[2 * j]) * inv));
        const uint32_t l = nf4_index(nf4_clamp(Fmt::load(wb[2 * j + 1]) * inv));
        out[j] = static_cast<uint8_t>((h << 4) | l);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < pairs; ++j) {
        const uint32_t h = nf4_index(nf4_clamp(Fmt::load(wb[2 * j]) / div));
        const uint32_t l = nf4_index(nf4_clamp(Fmt::load(wb[2 * j + 1]) / div));
        out[j] = static_cast<uint8_t>((h << 4) | l);
      }
      if (len & 1) out[pairs] = static_cast<uint8_t>((nf4_index(nf4_clamp(Fmt::load(wb[len - 1]) / div)) << 4) |
                                                     kNF4PadIndex);
    }
  }
}

// Blocks [b_lo, b_hi) of the double-quantized absmax: out[i] = code[q[i]]·absmax2[b] + offset, the product rounded
// to float32 before the sum, as bitsandbytes computes it. fp-contract=off keeps GCC from fusing the two into an FMA
// where the target has one (every aarch64 core): tests/test_nf4.py checks the bits.
__attribute__((optimize("fp-contract=off"))) void absmax_blocks(const uint8_t* q, int64_t n, const float* code,
                                                                 const float* absmax2, float offset, int64_t bs,
                                                                 int64_t b_lo, int64_t b_hi, float* out) {
  for (int64_t b = b_lo; b < b_hi; ++b) {
    const float s = absmax2[b];
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) {
      const float scaled = code[q[i]] * s;
      out[i] = scaled + offset;
    }
  }
}

}  // namespace

Status nf4_quantize(const void* w, FloatFormat format, int64_t n, int64_t blocksize, uint8_t* packed,
                    float* absmax) noexcept {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  with_f32_f16_format(format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    const auto* src = static_cast<const typename Fmt::storage*>(w);
    parallel_for(0, nblocks, std::max<int64_t>(1, (int64_t{1} << 14) / blocksize), [&](int64_t lo, int64_t hi) {
      quantize_blocks<Fmt>(src, n, blocksize, lo, hi, packed, absmax);
    });
  });
  return Status::ok;
}

Status nf4_dequantize(const NF4Weights& w, int64_t n, FloatFormat format, void* out) noexcept {
  constexpr int64_t kStep = 1 << 14;  // weights per task step
  with_f32_f16_format(format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    auto* dst = static_cast<typename Fmt::storage*>(out);
    parallel_for(0, (n + kStep - 1) / kStep, 1, [&](int64_t lo, int64_t hi) {
      decode_range<Fmt>(w, lo * kStep, std::min(n, hi * kStep), dst + lo * kStep);
    });
  });
  return Status::ok;
}

Status nf4_absmax_dequantize(const uint8_t* qabsmax, int64_t n, const float* code, const float* absmax2, float offset,
                             int64_t blocksize, float* out) noexcept {
  parallel_for(0, (n + blocksize - 1) / blocksize, std::max<int64_t>(1, (int64_t{1} << 16) / blocksize),
               [&](int64_t lo, int64_t hi) {
                 absmax_blocks(qabsmax, n, code, absmax2, offset, blocksize, lo, hi, out);
               });
  return Status::ok;
}

}  // namespace slimrate::core

// Torch-free helpers shared by the CPU and CUDA kernels: bit casts and the 16-bit float formats
// stored as uint16_t. Every function is branch-free so the CPU loops auto-vectorise; bit casts use
// __builtin_bit_cast (GCC >= 11, clang), since memcpy temporaries block `omp simd` vectorisation.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SLIMRATE_HD __host__ __device__ __forceinline__
#else
#define SLIMRATE_HD inline __attribute__((always_inline))
#endif

namespace slimrate {

SLIMRATE_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

SLIMRATE_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

SLIMRATE_HD double bits_to_f64(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  return __builtin_bit_cast(double, u);
#endif
}

SLIMRATE_HD uint64_t f64_to_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  return __builtin_bit_cast(uint64_t, d);
#endif
}

// bfloat16 is the high half of a float32; rounding to nearest even, NaN kept quiet.
SLIMRATE_HD float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

SLIMRATE_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded);
}

// IEEE half <-> float32 without branches, after the method of Maratyszcza's FP16 library
// (denormals via a magic-number subtraction, rounding to nearest even via float addition).
SLIMRATE_HD float f16_to_f32(uint16_t h) {
  uint32_t w = static_cast<uint32_t>(h) << 16;
  uint32_t sign = w & 0x80000000u;
  uint32_t two_w = w + w;
  float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  uint32_t magnitude = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
  return bits_to_f32(sign | magnitude);
}

SLIMRATE_HD uint16_t f32_to_f16(float f) {
  float abs_f = bits_to_f32(f32_to_bits(f) & 0x7FFFFFFFu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t w = f32_to_bits(f);
  uint32_t shl1_w = w + w;
  uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  uint32_t bits = f32_to_bits(base);
  uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Storage formats: `storage` is what lies in memory; load/store convert to and from `compute`,
// float32 for the 16/32-bit formats and float64 for float64.
struct F32 {
  using storage = float;
  using compute = float;
  SLIMRATE_HD static float load(float v) { return v; }
  SLIMRATE_HD static float store(float v) { return v; }
};
struct F64 {
  using storage = double;
  using compute = double;
  SLIMRATE_HD static double load(double v) { return v; }
  SLIMRATE_HD static double store(double v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  using compute = float;
  SLIMRATE_HD static float load(uint16_t v) { return bf16_to_f32(v); }
  SLIMRATE_HD static uint16_t store(float v) { return f32_to_bf16(v); }
};
struct F16 {
  using storage = uint16_t;
  using compute = float;
  SLIMRATE_HD static float load(uint16_t v) { return f16_to_f32(v); }
  SLIMRATE_HD static uint16_t store(float v) { return f32_to_f16(v); }
};

}  // namespace slimrate

// Torch-free per-element math of the BackSlash rate proxy R(θ) = (1/N) Σ (|θ|+ε)^ν
// (docs/backslash.md §2), shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>

#include "kernels/portable.h"

namespace slimrate {

SLIMRATE_HD float clamp_to(float y, float lo, float hi) { return y < lo ? lo : (y > hi ? hi : y); }
SLIMRATE_HD double clamp_to(double y, double lo, double hi) { return y < lo ? lo : (y > hi ? hi : y); }

// exp and expm1 of a polynomial-math struct M (float or double, its integer I) from its range reduction
// y = n·ln2 + r, |r| ≤ ln2/2 (M::reduce), its e^r − 1 polynomial (M::expm1_reduced), 2^n (M::pow2) and its
// clamps (M::kExpMin, …).
template <class M, class T, class I>
struct ExpFromReduction {
  // e^y = (1 + (e^r − 1))·2^n, 2^n in two factors n = n1 + n2, n1 = n/2, so each has a normal exponent and
  // n down to the smallest denormal's exponent stays exact.
  SLIMRATE_HD static T exp(T y) {
    I k;
    T p = T(1) + M::expm1_reduced(M::reduce(clamp_to(y, M::kExpMin, M::kExpMax), k));
    I k1 = k >> 1;
    return p * M::pow2(k1) * M::pow2(k - k1);
  }
  // e^y − 1 = 2^n·(e^r − 1) + (2^n − 1): as accurate as exp, and exact-relative for small y (n = 0).
  SLIMRATE_HD static T expm1(T y) {
    I k;
    T q = M::expm1_reduced(M::reduce(clamp_to(y, M::kExpm1Min, M::kExpm1Max), k));
    T t = M::pow2(k);
    return t * q + (t - T(1));
  }
};

// log, exp and expm1 in float32 from the Cephes polynomials (logf, expf; about 1 ulp each), free of calls
// and branches so CPU loops vectorise with 16 lanes on AVX-512.  Double-precision polynomials were
// measured first: half of torch's float32 error instead of about the same, but 1.5× slower
// (20 vs 13 ms for 16M fp32 weights on this 2-core machine).
struct PolyMathF32 : ExpFromReduction<PolyMathF32, float, int32_t> {
  using real = float;
  // x > 0.  x = m·2^e with m in [√½, √2), log x = e·ln2 + log(1 + f), f = m − 1; ln2 split into
  // an exact head and a tail.  Denormal x is scaled by 2^23 first.
  SLIMRATE_HD static float log(float x) {
    bool tiny = x < 1.17549435e-38f;
    uint32_t u = f32_to_bits(tiny ? x * 8388608.0f : x);
    float e = static_cast<float>(static_cast<int32_t>((u >> 23) & 0xFF)) - (tiny ? 150.0f : 127.0f);
    float m = bits_to_f32((u & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
    bool big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e = big ? e + 1.0f : e;
    float f = m - 1.0f;
    float z = f * f;
    float y = ((((((((7.0376836292e-2f * f - 1.1514610310e-1f) * f + 1.1676998740e-1f) * f -
                   1.2420140846e-1f) * f + 1.4249322787e-1f) * f - 1.6668057665e-1f) * f +
                 2.0000714765e-1f) * f - 2.4999993993e-1f) * f + 3.3333331174e-1f) * f * z;
    y += -2.12194440e-4f * e - 0.5f * z;
    return (f + y) + 0.693359375f * e;
  }
  // y = n·ln2 + r with |r| ≤ ln2/2 (ln2 split into an exact head and a tail); k = n.
  SLIMRATE_HD static float reduce(float y, int32_t& k) {
    constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
    float shifted = y * 1.44269504f + kRound;
    float n = shifted - kRound;
    k = static_cast<int32_t>(f32_to_bits(shifted) << 10) >> 10;  // n from the low 22 bits (two's complement)
    return (y - n * 0.693359375f) - n * -2.12194440e-4f;
  }
  // e^r − 1 for |r| ≤ ln2/2.
  SLIMRATE_HD static float expm1_reduced(float r) {
    return (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
             1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r;
  }
  SLIMRATE_HD static float pow2(int32_t k) { return bits_to_f32(static_cast<uint32_t>(k + 127) << 23); }
  // Below kExpMin e^y is a float32 denormal or 0; below kExpm1Min e^y is under half an ulp of 1.
  static constexpr float kExpMin = -103.0f, kExpMax = 88.7f, kExpm1Min = -30.0f, kExpm1Max = 88.0f;
};

// Full-precision libm, for float64 weights.
struct LibMath {
  using real = double;
  SLIMRATE_HD static double log(double x) { return ::log(x); }
  SLIMRATE_HD static double exp(double y) { return ::exp(y); }
};

// For one weight t:  r = (|t|+ε)^ν  and  g = sign(t)·(|t|+ε)^(ν−1),  so that
// ∂R/∂t = (ν/N)·g.  sign(0) = 0; with ε = 0 a zero weight gives r = 0 and g = 0.
template <class T>
struct RateTerm {
  T r, g;
};

template <class Math, class T = typename Math::real>
SLIMRATE_HD RateTerm<T> rate_term(typename Math::real t, typename Math::real nu, typename Math::real eps) {
  T a = (t < 0 ? -t : t) + eps;
  bool zero = a == T(0);
  T p = Math::exp((nu - T(1)) * Math::log(zero ? T(1) : a));  // (|t|+ε)^(ν−1)
  T sign = static_cast<T>((t > 0) - (t < 0));
  return {zero ? T(0) : a * p, zero ? T(0) : sign * p};
}

}  // namespace slimrate

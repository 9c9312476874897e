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
#ifdef NO_TINY
    bool tiny = false;
#else
    bool tiny = x < 1.17549435e-38f;
#endif
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

// log2 and exp2 in float32 for the CPU's rate loops, where a power x^y = 2^(y·log2 x) is all they need: shorter
// than PolyMathF32's log and exp (no select on the mantissa, no Cody–Waite reduction, no denormal results), free of
// calls and branches.  Polynomials fitted for this (minimax by Lawson's iteration in float64).  Over a dense sweep
// of x and y the power's relative error is that of PolyMathF32's exp(y·log x) (docs/kernels.md §8).
struct Pow2MathF32 {
  // log2 x for x > 0, and x = 0 (gives −150) where kDenormals: x = m·2^e with m in [√½, √2) (the bits of x minus
  // those of √½ split e and m), log2 x = e + f·Q(f), f = m − 1 exact, Q of degree 8 (absolute error 7e-9 in
  // exact arithmetic, 5e-8 in float32).  kDenormals scales x below 2^-126 by 2^23 first; without it such x give
  // wrong results, so callers pass it unless x ≥ 2^-126 is known.
  template <bool kDenormals>
  SLIMRATE_HD static float log2(float x) {
    constexpr uint32_t kSqrtHalf = 0x3F3504F3u;  // √½ in float32
    uint32_t u;
    float e;
    if constexpr (kDenormals) {
      bool tiny = x < 1.17549435e-38f;
      u = f32_to_bits(tiny ? x * 8388608.0f : x) - kSqrtHalf;
      e = static_cast<float>(static_cast<int32_t>(u) >> 23) - (tiny ? 23.0f : 0.0f);
    } else {
      u = f32_to_bits(x) - kSqrtHalf;
      e = static_cast<float>(static_cast<int32_t>(u) >> 23);
    }
    float f = bits_to_f32((u & 0x007FFFFFu) + kSqrtHalf) - 1.0f;
    // Q by Estrin's scheme: a 16-cycle chain of FMAs instead of Horner's 36, so more elements are in flight.
    float f2 = f * f, f4 = f2 * f2;
    float q01 = 1.44269490f - 7.21347153e-1f * f, q23 = 4.80922520e-1f - 3.60721201e-1f * f;
    float q45 = 2.87656665e-1f - 2.38519430e-1f * f, q67 = 2.17379421e-1f - 2.10303426e-1f * f;
    float q03 = q01 + q23 * f2, q48 = (q45 + q67 * f2) + 1.25412419e-1f * f4;
    float q = q03 + q48 * f4;
    return e + f * q;
  }
  // The range of y that exp2 takes; clamped there, its results are normal floats from 0.7·2^-126 to 1.4·2^127.
  static constexpr float kExp2Min = -126.0f, kExp2Max = 127.0f;
  // 2^y for y in [kExp2Min, kExp2Max] (callers clamp): n = round(y), 2^(y − n) = 1 + f·Q(f) on |f| ≤ ½, Q of
  // degree 5 (Cephes exp2f's; relative error 2e-9).
  SLIMRATE_HD static float exp2(float y) {
    constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer n, held in the low bits
    float shifted = y + kRound;
    float f = y - (shifted - kRound);
    float f2 = f * f;  // Estrin's scheme again
    float p01 = 6.9314720e-1f + 2.4022648e-1f * f, p23 = 5.5503325e-2f + 9.6184374e-3f * f;
    float p45 = 1.3398874e-3f + 1.5353362e-4f * f;
    float q = 1.0f + f * (p01 + (p23 + p45 * f2) * f2);
    // 2^n: n + 127 in the exponent field, from n's low 9 bits (two's complement) in shifted's mantissa.
    return q * bits_to_f32((f32_to_bits(shifted) << 23) + 0x3F800000u);
  }
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

// Torch-free per-element math of the BackSlash rate proxy R(θ) = (1/N) Σ (|θ|+ε)^ν
// (papers/backslash.md §2, §4), shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>

#include "kernels/portable.h"

namespace slimrate {

// log and exp in double precision from short polynomials, accurate to about 1e-9 relative:
// enough for results rounded to float32 or lower, and free of calls so CPU loops vectorise.
struct PolyMath {
  // x > 0 and normal.  x = m·2^e with m in [√½, √2];  log m = 2·atanh(s), s = (m−1)/(m+1),
  // |s| ≤ 0.172, series to s^9 (next term < 7e-10).
  SLIMRATE_HD static double log(double x) {
    uint64_t u = f64_to_bits(x);
    // The exponent field as a double without an int64 → double conversion (AVX-512DQ only):
    // 2^52 + field, built in the bits, minus 2^52.
    double e = (bits_to_f64(0x4330000000000000ull | ((u >> 52) & 0x7FF)) - 4503599627370496.0) - 1023.0;
    double m = bits_to_f64((u & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
    bool big = m > 1.4142135623730951;
    m = big ? 0.5 * m : m;
    e = big ? e + 1.0 : e;
    double s = (m - 1.0) / (m + 1.0);
    double s2 = s * s;
    double series = 1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9))));
    return 2.0 * s * series + e * 0.6931471805599453;
  }
  // y clamped to [-700, 700] (far outside float range);  y = n·ln2 + r, |r| ≤ ln2/2,
  // Taylor to r^8 (remainder < 3e-10 relative), 2^n built in the exponent bits.
  SLIMRATE_HD static double exp(double y) {
    y = y < -700.0 ? -700.0 : (y > 700.0 ? 700.0 : y);
    constexpr double kRound = 6755399441055744.0;  // 1.5·2^52: adding it rounds to an integer
    double shifted = y * 1.4426950408889634 + kRound;
    double n = shifted - kRound;
    double r = (y - n * 0.6931471803691238) - n * 1.9082149292705877e-10;  // ln2 split hi + lo
    double p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 +
               r * (1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320))))))));
    // 2^n from the bits of `shifted`, whose low 12 bits hold n mod 4096 (no double → int64
    // conversion): n + 1023 ∈ [1, 2046] is the biased exponent; higher bits shift out.
    return p * bits_to_f64((f64_to_bits(shifted) + 1023) << 52);
  }
};

// Full-precision libm, for float64 weights.
struct LibMath {
  SLIMRATE_HD static double log(double x) { return ::log(x); }
  SLIMRATE_HD static double exp(double y) { return ::exp(y); }
};

// For one weight t:  r = (|t|+ε)^ν  and  g = sign(t)·(|t|+ε)^(ν−1),  so that
// ∂R/∂t = (ν/N)·g.  sign(0) = 0; with ε = 0 a zero weight gives r = 0 and g = 0.
struct RateTerm {
  double r, g;
};

template <class Math>
SLIMRATE_HD RateTerm rate_term(double t, double nu, double eps) {
  double a = (t < 0 ? -t : t) + eps;
  bool zero = a == 0.0;
  double p = Math::exp((nu - 1.0) * Math::log(zero ? 1.0 : a));  // (|t|+ε)^(ν−1)
  double sign = static_cast<double>((t > 0) - (t < 0));
  return {zero ? 0.0 : a * p, zero ? 0.0 : sign * p};
}

}  // namespace slimrate

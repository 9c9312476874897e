// Torch-free closed forms of DMB's structured rate matrix (docs/dmb.md §3–§4), shared by the CPU
// and CUDA kernels: per-element functions that CPU loops vectorise and CUDA threads call one by one.
//
// Conventions (docs/dmb.md §2): row vectors; at one position, state y has rank j = perm[y], perm_inv[j] is the
// state at rank j; lam[j] = Λ_j = −Σ_{i≥j} a_i (non-decreasing, Λ_{V−1} = 0) in rank order; the rate from
// rank i to rank j > i is a_{j−1} = Λ_j − Λ_{j−1}.  With E_j = exp(hΛ_j) (docs/dmb.md §4):
//   p(y|x0) = 0 for j < k0 = rank(x0),  E_{k0} at j = k0,  E_j − E_{j−1} = E_j·(1 − e^{−h·a_{j−1}}) for j > k0;
//   Q[y, x] (rates into x at rank k) = a_{k−1} for j < k,  Λ_k at j = k,  0 for j > k.
// Both follow from Q = A·U·diag(Λ)·U⁻¹·A⁻¹ with U the all-ones upper triangle (docs/dmb.md §3, Lemma 4.3):
// exp(hQ) = (AU)·diag(E)·(AU)⁻¹, whose row k0 is U's row k0 (ones from k0 on) times diag(E) times U⁻¹
// (first differences).  E_j − E_{j−1} is computed as E_j·(−expm1(−h·a_{j−1})), so probabilities of
// slowly-entered states keep their relative precision.
#pragma once
#include <cstdint>

#include "kernels/portable.h"
#include "kernels/rate_terms.h"

namespace slimrate {

// exp, expm1 and log in float64 without calls or branches (CPU loops vectorise with 8 lanes on AVX-512):
// the float64 twin of PolyMathF32 (kernels/rate_terms.h).
struct PolyMathF64 : ExpFromReduction<PolyMathF64, double, int64_t> {
  using real = double;
  // y = n·ln2 + r with |r| ≤ ln2/2 (fdlibm's ln2 hi/lo); k = n.
  SLIMRATE_HD static double reduce(double y, int64_t& k) {
    constexpr double kRound = 6755399441055744.0;  // 1.5·2^52: adding it rounds to an integer
    double shifted = y * 1.4426950408889634 + kRound;
    double n = shifted - kRound;
    k = static_cast<int64_t>(f64_to_bits(shifted) << 13) >> 13;  // n from the low 51 bits (two's complement)
    return (y - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  }
  // e^r − 1 = r + r²·(1/2 + r/6 + … + r^11/13!) for |r| ≤ ln2/2 (Taylor remainder (ln2/2)^14/14! ≈ 4e-18).
  SLIMRATE_HD static double expm1_reduced(double r) {
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    return p * (r * r) + r;
  }
  SLIMRATE_HD static double pow2(int64_t k) { return bits_to_f64(static_cast<uint64_t>(k + 1023) << 52); }
  // Below kExpMin e^y is a denormal or 0; below kExpm1Min e^y is under half an ulp of 1.
  static constexpr double kExpMin = -745.2, kExpMax = 709.7, kExpm1Min = -60.0, kExpm1Max = 709.0;
  // x > 0 finite.  x = m·2^e, m in [√½, √2), f = m − 1, s = f/(2+f):
  // log(1+f) = f − f²/2 + s·(f²/2 + R(s²)), R(z) = Σ_{k=1..10} 2z^k/(2k+1) (fdlibm's e_log.c identity with
  // the atanh series; z ≤ 0.0295 leaves 2e-19).  Denormal x is scaled by 2^54 first.
  SLIMRATE_HD static double log(double x) {
    bool tiny = x < 2.2250738585072014e-308;
    uint64_t u = f64_to_bits(tiny ? x * 18014398509481984.0 : x);
    double e = static_cast<double>(static_cast<int64_t>((u >> 52) & 0x7FF)) - (tiny ? 1077.0 : 1023.0);
    double m = bits_to_f64((u & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
    bool big = m > 1.4142135623730951;
    m = big ? 0.5 * m : m;
    e = big ? e + 1.0 : e;
    double f = m - 1.0;
    double s = f / (2.0 + f);
    double z = s * s;
    double R = 2.0 / 21.0;
    R = R * z + 2.0 / 19.0;
    R = R * z + 2.0 / 17.0;
    R = R * z + 2.0 / 15.0;
    R = R * z + 2.0 / 13.0;
    R = R * z + 2.0 / 11.0;
    R = R * z + 2.0 / 9.0;
    R = R * z + 2.0 / 7.0;
    R = R * z + 2.0 / 5.0;
    R = R * z + 2.0 / 3.0;
    R *= z;
    double hfsq = 0.5 * f * f;
    return e * 6.93147180369123816490e-01 + ((f - hfsq + s * (hfsq + R)) + e * 1.90821492927058770002e-10);
  }
};

// The polynomial math of a CPU kernel computing in T.
template <class T>
struct PolyMathFor {
  using type = PolyMathF32;
};
template <>
struct PolyMathFor<double> {
  using type = PolyMathF64;
};

// 1 − e^{−x} for x ≥ 0, accurate to a few ulps relative also for tiny x (expm1, not 1 − exp).
template <class Math, class T = typename Math::real>
SLIMRATE_HD T one_minus_exp_neg(T x) {
  return -Math::expm1(-x);
}

// p(y | x0) for y at rank j: lam_j = Λ_j, rate_j = a_{j−1} = Λ_j − Λ_{j−1} (anything at j = 0, unused).
// Ranks are int32 or int64 (I): the width of T keeps vector lanes aligned on the CPU.
template <class Math, class T, class I>
SLIMRATE_HD T transition_prob(T h, T lam_j, T rate_j, I j, I k0) {
  T e = Math::exp(h * lam_j);
  T f = j == k0 ? T(1) : one_minus_exp_neg<Math>(h * rate_j);
  return j < k0 ? T(0) : e * f;
}

// Q[y, x] for y at rank j and x at rank k: rate_k = a_{k−1} (0 when k = 0), lam_k = Λ_k.
template <class T, class I>
SLIMRATE_HD T rate_into(I j, I k, T rate_k, T lam_k) {
  return j < k ? rate_k : (j == k ? lam_k : T(0));
}

// log p(x_t | x0) for x_t at rank k ≥ k0: hΛ_k, plus log(1 − e^{−h·a_{k−1}}) when k > k0
// (−inf when that factor is 0: x_t unreachable).
template <class Math, class T, class I>
SLIMRATE_HD T log_transition_prob(T h, T lam_k, T rate_k, I k, I k0, T neg_inf) {
  T f = k == k0 ? T(1) : one_minus_exp_neg<Math>(h * rate_k);
  return h * lam_k + (f > T(0) ? Math::log(f > T(0) ? f : T(1)) : neg_inf);
}

// One y's share of the score entropy (docs/dmb.md §4, SEDD's DSE), without the row weight w = σ·a_{k−1}:
//   term = e^s − r·s + r(log r − 1),  d term / ds = e^s − r,   r = p(y|x0)/p(x_t|x0),
// counted only for y at rank j < k = rank(x_t) (the states with a rate into x_t, so never y = x_t).
// r = 0 below k0 (and where a_{j−1} = 0); log r = log p_j − log p_k in log space, so E_j underflowing
// never turns r into 0/0.
template <class T>
struct ScoreTerm {
  T loss, grad;
};

template <class Math, class T, class I>
SLIMRATE_HD ScoreTerm<T> score_entropy_term(T s, T h, T lam_j, T rate_j, I j, I k0, I k, T logp_k) {
  // Masks are float selects, never a bool from an int and a float compare: GCC 12 does not vectorise the latter.
  T es = Math::exp(s);
  T f = j == k0 ? T(1) : one_minus_exp_neg<Math>(h * rate_j);
  f = j < k0 ? T(0) : f;  // p_j = E_j·f: f = 0 where r = 0
  T log_r = h * lam_j + Math::log(f > T(0) ? f : T(1)) - logp_k;
  T r = f > T(0) ? Math::exp(log_r) : T(0);
  T term = es + (f > T(0) ? r * (log_r - T(1) - s) : T(0));
  return {j < k ? term : T(0), j < k ? es - r : T(0)};
}

// Backward of one transition-row entry in rank order: with G'_j the output gradient at rank j,
// Σ_j G'_j p_j = Σ_{j≥k0} E_j (G'_j − G'_{j+1}) (summation by parts, G'_V = 0), so
//   ∂/∂Λ_j = h·E_j·(G'_j − G'_{j+1}),  ∂/∂h = Σ_j Λ_j·E_j·(G'_j − G'_{j+1})  for j ≥ k0.
// Returns c = E_j·(G'_j − G'_{j+1}) (0 below k0).
template <class Math, class T, class I>
SLIMRATE_HD T transition_backward_coef(T h, T lam_j, T g_j, T g_next, I j, I k0) {
  T c = Math::exp(h * lam_j) * (g_j - g_next);
  return j < k0 ? T(0) : c;
}

}  // namespace slimrate

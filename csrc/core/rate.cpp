// Bodies of the rate kernels of core/rate.h: loops written for the auto-vectoriser, compiled per x86 ISA
// (core/arch.h: rate_stats as target clones, rate_grad through run_for_isa, so SLIMRATE_CPU_ISA can pick its code).
// setup.py adds -fno-trapping-math so GCC may if-convert the selects.
#include "core/rate.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <type_traits>
#include <vector>

#include "core/arch.h"
#include "core/parallel.h"
#include "kernels/rate_terms.h"

namespace slimrate::core {
namespace {

// Elements per block of rate_grad_span, whose r terms are summed in the compute type (float32 for all but
// float64 weights) before the block's sum is added in float64: 256 keeps a float32 vector lane at 32 terms or
// fewer (8 lanes with AVX2, 16 with AVX-512), a relative error of at most about 32·2^-24 and typically
// √32·2^-25, well inside the per-term error of the power.
constexpr int64_t kBlock = 256;

template <class Fmt>
SLIMRATE_CPU_CLONES void stats_span(const typename Fmt::storage* x, int64_t n, double* out) {
  double sum_abs = 0.0, sum_sq = 0.0;
#pragma omp simd reduction(+ : sum_abs, sum_sq)
  for (int64_t i = 0; i < n; ++i) {
    double v = Fmt::load(x[i]);
    sum_abs += v < 0 ? -v : v;
    sum_sq += v * v;
  }
  out[0] = sum_abs;
  out[1] = sum_sq;
}

// The powers of a = |θ|+ε that rate_grad_span needs, {r = a^ν, p = a^(ν−1)}; rate_grad picks one per call.
// Each gives r = 0 at a = 0 (p may then be infinite: sign(0) = 0 masks it).
template <class T>
struct Powers {
  T r, p;
};

// Any ν: p = 2^((ν−1)·log2 a) (Pow2MathF32), r = a·p.  kDenormals where ε < 2^-126 (a may be denormal or 0);
// log2 0 is finite, so p is and r = 0 at a = 0.
// The clamp of y to exp2's range reads its bounds from members: with literal bounds GCC 12 evaluates exp2 at the
// bound and selects after the polynomial (10 instructions per vector instead of vmaxps and vminps).
template <bool kDenormals>
struct PowerAny {
  using real = float;
  float nu_m1, y_min = Pow2MathF32::kExp2Min, y_max = Pow2MathF32::kExp2Max;
  SLIMRATE_HD Powers<float> operator()(float a) const {
    float y = nu_m1 * Pow2MathF32::log2<kDenormals>(a);
    y = y > y_min ? y : y_min;
    y = y < y_max ? y : y_max;
    float p = Pow2MathF32::exp2(y);
    return {a * p, p};
  }
};

// ν = 1, 2 and ½ exactly, with no transcendental: the rate is then memory-bound.
struct PowerOne {
  using real = float;
  SLIMRATE_HD Powers<float> operator()(float a) const { return {a, 1.0f}; }
};

struct PowerTwo {
  using real = float;
  SLIMRATE_HD Powers<float> operator()(float a) const { return {a * a, a}; }
};

struct PowerHalf {
  using real = float;
  SLIMRATE_HD Powers<float> operator()(float a) const {
    float s = std::sqrt(a);
    return {s, 1.0f / s};
  }
};

// float64 weights: libm.
struct PowerLib {
  using real = double;
  double nu_m1;
  SLIMRATE_HD Powers<double> operator()(double a) const {
    double p = std::exp(nu_m1 * std::log(a == 0.0 ? 1.0 : a));
    return {a * p, p};
  }
};

// Calls fn with the Power of ν and ε for weights stored as Fmt.
template <class Fmt, class Fn>
auto with_power(double nu, double eps, Fn&& fn) {
  if constexpr (std::is_same_v<Fmt, F64>) {
    return fn(PowerLib{nu - 1.0});
  } else {
    if (nu == 1.0) return fn(PowerOne{});
    if (nu == 2.0) return fn(PowerTwo{});
    if (nu == 0.5) return fn(PowerHalf{});
    float nu_m1 = static_cast<float>(nu - 1.0);
    if (static_cast<float>(eps) < 1.17549435e-38f) return fn(PowerAny<true>{nu_m1});
    return fn(PowerAny<false>{nu_m1});
  }
}

// grad[i] += scale·sign(θ[i])·p(θ[i]); returns Σ r(θ[i]), summed per kBlock in Power::real (a vector reduction),
// then in float64.  theta and grad may be the same memory (decoupled update): each element is read before it is
// written, so `omp simd` holds.  Measured on a 2-core AMD EPYC (Zen 3, AVX2), 16M fp32 weights, one thread (CPU
// time of this core alone): ν = 1.37 takes 20–24 ms where the PolyMathF32 loop with float64 lanes took 48–55 ms;
// ν = ½, 1, 2 within 1.3× of a plain g += θ loop over the same bytes (7–9 ms).
template <class Fmt, class Power>
double rate_grad_span(const typename Fmt::storage* theta, typename Fmt::storage* grad, int64_t n,
                      Power power, double eps_d, double scale_d) {
  using T = typename Power::real;
  T eps = static_cast<T>(eps_d), scale = static_cast<T>(scale_d);
  double sum_r = 0.0;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    int64_t len = n - begin < kBlock ? n - begin : kBlock;
    const auto* th = theta + begin;
    auto* gr = grad + begin;
    T block_r = T(0);
#pragma omp simd reduction(+ : block_r)
    for (int64_t i = 0; i < len; ++i) {
      T t = Fmt::load(th[i]);
      Powers<T> pw = power(std::fabs(t) + eps);
      T g = t == T(0) ? T(0) : std::copysign(pw.p, t);
      gr[i] = Fmt::store(Fmt::load(gr[i]) + scale * g);
      block_r += pw.r;
    }
    sum_r += block_r;
  }
  return sum_r;
}

struct Chunk {
  size_t tensor;
  int64_t begin, end;
};

std::vector<Chunk> make_chunks(const int64_t* numels, size_t count) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < count; ++t)
    for (int64_t b = 0; b < numels[t]; b += kRateChunk)
      chunks.push_back({t, b, std::min(b + kRateChunk, numels[t])});
  return chunks;
}

template <class Fmt>
const typename Fmt::storage* elements(const void* data, int64_t offset) {
  return static_cast<const typename Fmt::storage*>(data) + offset;
}

template <class Fmt>
typename Fmt::storage* elements(void* data, int64_t offset) {
  return static_cast<typename Fmt::storage*>(data) + offset;
}

}  // namespace

Status rate_stats(const void* const* tensors, const int64_t* numels, const FloatFormat* formats, size_t count,
                  double out[3]) noexcept {
  std::vector<Chunk> chunks;
  std::vector<double> partial;
  try {
    chunks = make_chunks(numels, count);
    partial.resize(2 * chunks.size());
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
  parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      with_format(formats[ch.tensor], [&](auto fmt) {
        using Fmt = decltype(fmt);
        stats_span<Fmt>(elements<Fmt>(tensors[ch.tensor], ch.begin), ch.end - ch.begin, &partial[2 * c]);
      });
    }
  });
  int64_t n = 0;
  for (size_t t = 0; t < count; ++t) n += numels[t];
  double sum_abs = 0.0, sum_sq = 0.0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    sum_abs += partial[2 * c];
    sum_sq += partial[2 * c + 1];
  }
  out[0] = static_cast<double>(n);
  out[1] = sum_abs;
  out[2] = sum_sq;
  return Status::ok;
}

Status rate_grad(const void* const* thetas, void* const* grads, const int64_t* numels, const FloatFormat* formats,
                 size_t count, double lam, double nu, double eps, double* r) noexcept {
  CpuIsa isa;
  if (!selected_cpu_isa(&isa)) return Status::bad_cpu_isa;
  int64_t n = 0;
  for (size_t t = 0; t < count; ++t) n += numels[t];
  *r = 0.0;
  if (n == 0) return Status::ok;
  std::vector<Chunk> chunks;
  std::vector<double> partial;
  try {
    chunks = make_chunks(numels, count);
    partial.resize(chunks.size());
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
  double scale = lam * nu / static_cast<double>(n);
  parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      with_format(formats[ch.tensor], [&](auto fmt) {
        using Fmt = decltype(fmt);
        const auto* theta = elements<Fmt>(thetas[ch.tensor], ch.begin);
        auto* grad = elements<Fmt>(grads[ch.tensor], ch.begin);
        int64_t len = ch.end - ch.begin;
        with_power<Fmt>(nu, eps, [&](auto power) {
          partial[c] = run_for_isa(isa, [&] { return rate_grad_span<Fmt>(theta, grad, len, power, eps, scale); });
        });
      });
    }
  });
  double sum_r = 0.0;
  for (double p : partial) sum_r += p;
  *r = sum_r / static_cast<double>(n);
  return Status::ok;
}

}  // namespace slimrate::core

// Bodies of the rate kernels of core/rate.h: loops written for the auto-vectoriser, cloned per x86 ISA
// (core/arch.h). setup.py adds -fno-trapping-math so GCC may if-convert the selects.
#include "core/rate.h"

#include <algorithm>
#include <new>
#include <type_traits>
#include <vector>

#include "core/arch.h"
#include "core/parallel.h"
#include "kernels/rate_terms.h"

namespace slimrate::core {
namespace {

// rate_grad_span sums through lanes, not `omp simd reduction`: with that pragma GCC 12 vectorised its loop only
// in the AVX-512 clone; lanes plus -fno-trapping-math took 16M fp32 weights from 108 ms to 20 ms on a 2-core
// AVX-512 machine (13 ms with the float32 math of rate_terms.h).
// Independent partial sums, so the float64 sum of r vectorises without reassociation (no -ffast-math).
constexpr int kLanes = 8;
// Elements per inner block of rate_grad_span: its r values sit in a stack buffer (2 KiB).
constexpr int64_t kBlock = 256;

SLIMRATE_HD double add_lanes(const double (&lanes)[kLanes]) {
  double total = 0.0;
  for (double v : lanes) total += v;
  return total;
}

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

// grad[i] += scale·g(θ[i]); returns Σ r(θ[i]).  theta and grad may be the same memory
// (decoupled update): each element is read before it is written, hence `ivdep`.
template <class Fmt, class Math>
SLIMRATE_CPU_CLONES double rate_grad_span(const typename Fmt::storage* theta, typename Fmt::storage* grad,
                                          int64_t n, double nu_d, double eps_d, double scale_d) {
  using T = typename Math::real;
  T nu = static_cast<T>(nu_d), eps = static_cast<T>(eps_d), scale = static_cast<T>(scale_d);
  double sum_r[kLanes] = {};
  double r[kBlock];
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    int64_t len = n - begin < kBlock ? n - begin : kBlock;
    const auto* th = theta + begin;
    auto* gr = grad + begin;
#pragma GCC ivdep
    for (int64_t i = 0; i < len; ++i) {
      auto term = rate_term<Math>(Fmt::load(th[i]), nu, eps);
      gr[i] = Fmt::store(Fmt::load(gr[i]) + scale * term.g);
      r[i] = term.r;
    }
    for (int64_t i = len; i < kBlock; ++i) r[i] = 0.0;
    for (int64_t i = 0; i < kBlock; i += kLanes)
      for (int j = 0; j < kLanes; ++j) sum_r[j] += r[i + j];
  }
  return add_lanes(sum_r);
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
        if constexpr (std::is_same_v<Fmt, F64>)
          partial[c] = rate_grad_span<Fmt, LibMath>(theta, grad, len, nu, eps, scale);
        else
          partial[c] = rate_grad_span<Fmt, PolyMathF32>(theta, grad, len, nu, eps, scale);
      });
    }
  });
  double sum_r = 0.0;
  for (double p : partial) sum_r += p;
  *r = sum_r / static_cast<double>(n);
  return Status::ok;
}

}  // namespace slimrate::core

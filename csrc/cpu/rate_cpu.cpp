// CPU kernels of the BackSlash rate ops (schemas in csrc/ops.cpp): one pass over all tensors,
// split into fixed chunks run with at::parallel_for; per-chunk partial sums in double are added
// in chunk order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/float_formats.h"
#include "kernels/rate_terms.h"
#include "rate_inputs.h"

namespace slimrate {
namespace {

// 64 Ki elements per task: large enough to amortise scheduling, small enough to balance
// ~50 tensors of uneven sizes over the cores.
constexpr int64_t kChunk = int64_t{1} << 16;

// One build runs vectorised on AVX-512, AVX2 and baseline x86-64; the loops below are written for
// GCC's auto-vectoriser (setup.py adds -fno-trapping-math so it may if-convert the selects).
// rate_grad_span sums through lanes, not `omp simd reduction`: with that pragma GCC 12 vectorised
// its loop only in the AVX-512 clone; lanes plus -fno-trapping-math took 16M fp32 weights from
// 108 ms to 20 ms on this 2-core AVX-512 machine (13 ms with the float32 math of rate_terms.h).
#define SLIMRATE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

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

std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t)
    for (int64_t b = 0; b < tensors[t].numel(); b += kChunk)
      chunks.push_back({t, b, std::min(b + kChunk, tensors[t].numel())});
  return chunks;
}

at::Tensor rate_stats_cpu(at::TensorList tensors) {
  RateInputs in = stats_inputs(tensors, at::kCPU);
  const std::vector<at::Tensor>& xs = in.thetas;
  auto chunks = make_chunks(xs);
  std::vector<double> partial(2 * chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      with_format(xs[ch.tensor].scalar_type(), [&](auto fmt) {
        using Fmt = decltype(fmt);
        stats_span<Fmt>(data_of<Fmt>(xs[ch.tensor]) + ch.begin, ch.end - ch.begin, &partial[2 * c]);
      });
    }
  });
  double sum_abs = 0.0, sum_sq = 0.0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    sum_abs += partial[2 * c];
    sum_sq += partial[2 * c + 1];
  }
  return at::tensor({static_cast<double>(in.numel), sum_abs, sum_sq}, at::dtype(at::kDouble));
}

at::Tensor rate_grad_cpu(at::TensorList params, at::TensorList grads, double lam, double nu, double eps) {
  RateInputs in = grad_inputs(params, grads, nu, eps, at::kCPU);
  const std::vector<at::Tensor>& thetas = in.thetas;
  int64_t n = in.numel;
  if (n == 0) return at::zeros({}, at::dtype(at::kDouble));
  double scale = lam * nu / static_cast<double>(n);
  auto chunks = make_chunks(thetas);
  std::vector<double> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      with_format(thetas[ch.tensor].scalar_type(), [&](auto fmt) {
        using Fmt = decltype(fmt);
        auto* grad = reinterpret_cast<typename Fmt::storage*>(in.grads[ch.tensor].data_ptr()) + ch.begin;
        const auto* theta = data_of<Fmt>(thetas[ch.tensor]) + ch.begin;
        int64_t len = ch.end - ch.begin;
        if constexpr (std::is_same_v<Fmt, F64>)
          partial[c] = rate_grad_span<Fmt, LibMath>(theta, grad, len, nu, eps, scale);
        else
          partial[c] = rate_grad_span<Fmt, PolyMathF32>(theta, grad, len, nu, eps, scale);
      });
    }
  });
  write_back(grads, in);
  double sum_r = 0.0;
  for (double p : partial) sum_r += p;
  return at::scalar_tensor(sum_r / static_cast<double>(n), at::dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("rate_stats", &rate_stats_cpu);
  m.impl("rate_grad_", &rate_grad_cpu);
}

}  // namespace slimrate

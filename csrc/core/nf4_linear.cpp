// Bodies of the NF4 linear-layer kernels of core/nf4.h: the augmented matrices decoded a row segment or a panel at
// a time, the fused few-token products (loops written for the auto-vectoriser, cloned per x86 ISA by core/arch.h)
// and the panel schedules around the caller's GEMM.
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "core/arch.h"
#include "core/nf4.h"
#include "core/nf4_decode.h"
#include "core/parallel.h"

namespace slimrate::core {
namespace {

// Fused schedule: rows decoded together, and the column chunk each row segment covers (4 × 1024 floats =
// 16 KiB of decoded weights in L1 next to the tokens' slices of x or of the gradient accumulators).
constexpr int64_t kGroupRows = 4;
constexpr int64_t kChunk = 1024;

// ---- the augmented matrices, one row segment at a time, in the buffer's format ----

// Forward: row o of [W | E] over columns [c0, c1).
template <class Fmt>
void fill_forward_row(const NF4Forward& m, int64_t o, int64_t c0, int64_t c1, typename Fmt::storage* dst) {
  const int64_t split = std::clamp(m.in, c0, c1);
  decode_range<Fmt>(m.w, o * m.in + c0, o * m.in + split, dst);
  for (int64_t c = split; c < c1; ++c) dst[c - c0] = Fmt::store(m.e[o * m.ecols + (c - m.in)]);
}

// Backward: row o of [W ; A] over columns [c0, c1).
template <class Fmt>
void fill_backward_row(const NF4Backward& m, int64_t o, int64_t c0, int64_t c1, typename Fmt::storage* dst) {
  if (o < m.out) {
    decode_range<Fmt>(m.w, o * m.in + c0, o * m.in + c1, dst);
  } else {
    for (int64_t c = c0; c < c1; ++c) dst[c - c0] = Fmt::store(m.a[(o - m.out) * m.in + c]);
  }
}

// acc[m·4 + r] += Σ_k x[m·ldx + k]·w[r·ldw + k] for 4 rows r and m < M, k < len.
SLIMRATE_CPU_CLONES void dot_rows4(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t len,
                                   float* acc) {
  const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < len; ++k) {
      const float v = xm[k];
      s0 += v * w0[k];
      s1 += v * w1[k];
      s2 += v * w2[k];
      s3 += v * w3[k];
    }
    acc[m * 4] += s0;
    acc[m * 4 + 1] += s1;
    acc[m * 4 + 2] += s2;
    acc[m * 4 + 3] += s3;
  }
}

// acc[m·ldacc + k] += Σ_r coef[r·M + m]·w[r·ldw + k] for 4 rows r, m < M, k < len.
SLIMRATE_CPU_CLONES void axpy_rows4(const float* coef, int64_t M, const float* w, int64_t ldw, int64_t len, float* acc,
                                    int64_t ldacc) {
  const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
  for (int64_t m = 0; m < M; ++m) {
    const float a0 = coef[m], a1 = coef[M + m], a2 = coef[2 * M + m], a3 = coef[3 * M + m];
    float* am = acc + m * ldacc;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) am[k] += a0 * w0[k] + a1 * w1[k] + a2 * w2[k] + a3 * w3[k];
  }
}

}  // namespace

Status nf4_forward_fused(const NF4Forward& m, const float* xa, int64_t M, float* y) noexcept {
  const int64_t ka = m.in + m.ecols, out = m.out;
  const int64_t groups = (out + kGroupRows - 1) / kGroupRows;
  return try_parallel_for(0, groups, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> wbuf(kGroupRows * kChunk, 0.0f), acc(M * kGroupRows);
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t o0 = g * kGroupRows, rows = std::min(kGroupRows, out - o0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c0 = 0; c0 < ka; c0 += kChunk) {
        const int64_t c1 = std::min(ka, c0 + kChunk);
        for (int64_t r = 0; r < kGroupRows; ++r) {
          if (r < rows) fill_forward_row<F32>(m, o0 + r, c0, c1, wbuf.data() + r * kChunk);
          else std::fill_n(wbuf.data() + r * kChunk, c1 - c0, 0.0f);
        }
        dot_rows4(xa + c0, ka, M, wbuf.data(), kChunk, c1 - c0, acc.data());
      }
      for (int64_t t = 0; t < M; ++t)
        for (int64_t r = 0; r < rows; ++r) y[t * out + o0 + r] = acc[t * kGroupRows + r];
    }
  });
}

// Each task owns a range of dx's columns (a multiple of 64 wide) and streams every row of [W ; A] over it, 4 rows ×
// kChunk columns decoded at a time, into dx: each element is accumulated by one task in row order, so results do
// not depend on the thread count.
Status nf4_backward_fused(const NF4Backward& m, const float* gat, int64_t M, float* dx) noexcept {
  const int64_t rows = m.out + m.r, in = m.in, threads = max_threads();
  const int64_t per = std::max<int64_t>(64, ((in + threads - 1) / threads + 63) / 64 * 64);  // columns per task
  return try_parallel_for(0, (in + per - 1) / per, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> wbuf(kGroupRows * kChunk, 0.0f), coef(kGroupRows * M);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t k0 = t * per, k1 = std::min(in, k0 + per);
      for (int64_t i = 0; i < M; ++i) std::fill(dx + i * in + k0, dx + i * in + k1, 0.0f);
      for (int64_t o0 = 0; o0 < rows; o0 += kGroupRows) {
        const int64_t nr = std::min(kGroupRows, rows - o0);
        std::fill(coef.begin(), coef.end(), 0.0f);
        std::copy(gat + o0 * M, gat + (o0 + nr) * M, coef.data());
        for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
          const int64_t c1 = std::min(k1, c0 + kChunk);
          for (int64_t r = 0; r < kGroupRows; ++r) {
            if (r < nr) fill_backward_row<F32>(m, o0 + r, c0, c1, wbuf.data() + r * kChunk);
            else std::fill_n(wbuf.data() + r * kChunk, c1 - c0, 0.0f);
          }
          axpy_rows4(coef.data(), M, wbuf.data(), kChunk, c1 - c0, dx + c0, in);
        }
      }
    }
  });
}

namespace {

// The panel schedule over [0, end): task t owns [t·per, min(end, (t+1)·per)) and runs it in panels of `step`:
// fill(buffer, first, count) decodes one into its buffer of buffer_elements (uninitialised: every panel is filled
// before it is read) and returns the panel's row stride, then gemm multiplies it.
template <class Storage, class Fill>
Status run_panels(int64_t end, int64_t per, int64_t step, int64_t buffer_elements, const NF4PanelGemm& gemm,
                  const Fill& fill) {
  std::atomic<bool> gemm_failed{false};
  Status status = try_parallel_for(0, (end + per - 1) / std::max<int64_t>(1, per), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t stop = std::min(end, (t + 1) * per);
      std::unique_ptr<Storage[]> buffer(new Storage[buffer_elements]);
      for (int64_t first = t * per; first < stop && !gemm_failed; first += step) {
        const int64_t count = std::min(step, stop - first);
        const int64_t ld = fill(buffer.get(), first, count);
        if (!gemm.run(gemm.context, buffer.get(), first, count, ld)) gemm_failed = true;
      }
    }
  });
  return gemm_failed ? Status::callback_failed : status;
}

}  // namespace

Status nf4_forward_panels(const NF4Forward& m, FloatFormat format, int64_t panel_bytes,
                          const NF4PanelGemm& gemm) noexcept {
  const int64_t ka = m.in + m.ecols, out = m.out, tasks = max_threads();
  return with_f32_f16_format(format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    using Storage = typename Fmt::storage;
    const int64_t fit = panel_bytes / (std::max<int64_t>(1, ka) * static_cast<int64_t>(sizeof(Storage)));
    const int64_t per = (out + tasks - 1) / std::max<int64_t>(1, tasks);
    const int64_t panel = std::max<int64_t>(1, std::min(per, std::max<int64_t>(16, fit)));
    return run_panels<Storage>(out, per, panel, panel * ka, gemm, [&](Storage* buf, int64_t o0, int64_t rows) {
      for (int64_t i = 0; i < rows; ++i) fill_forward_row<Fmt>(m, o0 + i, 0, ka, buf + i * ka);
      return ka;
    });
  });
}

Status nf4_backward_panels(const NF4Backward& m, FloatFormat format, int64_t panel_bytes,
                           const NF4PanelGemm& gemm) noexcept {
  const int64_t rows = m.out + m.r, in = m.in, tasks = max_threads();
  return with_f32_f16_format(format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    using Storage = typename Fmt::storage;
    const int64_t fit = panel_bytes / (std::max<int64_t>(1, rows) * static_cast<int64_t>(sizeof(Storage)));
    const int64_t per = std::max<int64_t>(64, ((in + tasks - 1) / std::max<int64_t>(1, tasks) + 63) / 64 * 64);
    const int64_t width = std::max<int64_t>(1, std::min({in, per, std::max<int64_t>(64, fit / 64 * 64)}));
    return run_panels<Storage>(in, per, width, rows * width, gemm, [&](Storage* buf, int64_t c0, int64_t cols) {
      for (int64_t i = 0; i < rows; ++i) fill_backward_row<Fmt>(m, i, c0, c0 + cols, buf + i * width);
      return width;
    });
  });
}

}  // namespace slimrate::core

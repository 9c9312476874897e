// Bodies of the block-CSR product of core/sparse.h: loops written for the auto-vectoriser, cloned per x86 ISA
// (core/arch.h), and on x86-64 explicit AVX-512 / AVX2 gathers for the batch-1 CSR product.
#include "core/sparse.h"

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "core/arch.h"
#include "core/parallel.h"
#include "kernels/portable.h"

#if SLIMRATE_X86_SIMD
#include <immintrin.h>
#endif

namespace slimrate::core {
namespace {

template <class Index>  // int32_t or uint16_t
struct Csr {
  const int64_t* row_ptr;
  const Index* col_idx;
  uint32_t last;  // bcols - 1: the largest valid block column
};

// Block column j, clamped into range; `bad` records a clamp (corrupt col_idx).
template <class Index>
inline uint32_t block_col(const Csr<Index>& w, int64_t j, uint32_t& bad) {
  uint32_t col = static_cast<uint32_t>(w.col_idx[j]);
  bad |= col > w.last;
  return col > w.last ? w.last : col;
}

// CSR (1×1 blocks), B = 1: y[i] = Σ_j v[j]·x[col[j]] over rows [lo, hi); `omp simd reduction` lets GCC
// reassociate the sum into vector lanes (measured: 3× faster than a scalar loop with 16 partial sums).
template <class Fmt, class Index>
SLIMRATE_CPU_CLONES uint32_t spmv_csr(const Csr<Index>& w, const typename Fmt::storage* v, const float* x, float* y,
                                      int64_t lo, int64_t hi) {
  uint32_t bad = 0;
  const uint32_t last = w.last;
  for (int64_t i = lo; i < hi; ++i) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum) reduction(| : bad)
    for (int64_t j = w.row_ptr[i]; j < w.row_ptr[i + 1]; ++j) {
      uint32_t col = static_cast<uint32_t>(w.col_idx[j]);
      bad |= col > last;
      sum += Fmt::load(v[j]) * x[col > last ? last : col];
    }
    y[i] = sum;
  }
  return bad;
}

#if SLIMRATE_X86_SIMD
// The same with explicit AVX-512 / AVX2 gathers of x: GCC's generic tuning does not emit gather
// instructions, and the batch-1 product is bound by them (measured below in bench/results/sparse.md).
#define SLIMRATE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define SLIMRATE_AVX2 __attribute__((target("avx2,fma,f16c")))

template <class Index>
SLIMRATE_AVX512 inline __m512i load_cols16(const Index* p, __mmask16 m) {
  if constexpr (sizeof(Index) == 2) return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  else return _mm512_maskz_loadu_epi32(m, p);
}

template <class Fmt>
SLIMRATE_AVX512 inline __m512 load_values16(const typename Fmt::storage* p, __mmask16 m) {
  if constexpr (std::is_same_v<Fmt, F32>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (std::is_same_v<Fmt, BF16>) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

template <class Fmt, class Index>
SLIMRATE_AVX512 uint32_t spmv_csr_avx512(const Csr<Index>& w, const typename Fmt::storage* v, const float* x,
                                         float* y, int64_t lo, int64_t hi) {
  const __m512i last = _mm512_set1_epi32(static_cast<int>(w.last));
  __mmask16 bad = 0;
  for (int64_t i = lo; i < hi; ++i) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t j = w.row_ptr[i];
    const int64_t end = w.row_ptr[i + 1];
    for (; j + 32 <= end; j += 32) {
      __m512i c0 = load_cols16(w.col_idx + j, 0xFFFF), c1 = load_cols16(w.col_idx + j + 16, 0xFFFF);
      bad |= _mm512_cmpgt_epu32_mask(c0, last) | _mm512_cmpgt_epu32_mask(c1, last);
      __m512 x0 = _mm512_i32gather_ps(_mm512_min_epu32(c0, last), x, 4);
      __m512 x1 = _mm512_i32gather_ps(_mm512_min_epu32(c1, last), x, 4);
      acc0 = _mm512_fmadd_ps(load_values16<Fmt>(v + j, 0xFFFF), x0, acc0);
      acc1 = _mm512_fmadd_ps(load_values16<Fmt>(v + j + 16, 0xFFFF), x1, acc1);
    }
    for (; j < end; j += 16) {
      __mmask16 m = end - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - j)) - 1);
      __m512i c = load_cols16(w.col_idx + j, m);
      bad |= _mm512_mask_cmpgt_epu32_mask(m, c, last);
      __m512 xs = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_min_epu32(c, last), x, 4);
      acc0 = _mm512_fmadd_ps(load_values16<Fmt>(v + j, m), xs, acc0);
    }
    y[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
  return bad != 0;
}

template <class Index>
SLIMRATE_AVX2 inline __m256i load_cols8(const Index* p) {
  if constexpr (sizeof(Index) == 2) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

template <class Fmt>
SLIMRATE_AVX2 inline __m256 load_values8(const typename Fmt::storage* p) {
  if constexpr (std::is_same_v<Fmt, F32>) {
    return _mm256_loadu_ps(p);
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<Fmt, BF16>) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

template <class Fmt, class Index>
SLIMRATE_AVX2 uint32_t spmv_csr_avx2(const Csr<Index>& w, const typename Fmt::storage* v, const float* x, float* y,
                                     int64_t lo, int64_t hi) {
  const __m256i last = _mm256_set1_epi32(static_cast<int>(w.last));
  __m256i bad = _mm256_setzero_si256();
  uint32_t bad_tail = 0;
  for (int64_t i = lo; i < hi; ++i) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = w.row_ptr[i];
    const int64_t end = w.row_ptr[i + 1];
    for (; j + 8 <= end; j += 8) {
      __m256i c = load_cols8(w.col_idx + j);
      __m256i clamped = _mm256_min_epu32(c, last);
      bad = _mm256_or_si256(bad, _mm256_xor_si256(c, clamped));
      acc = _mm256_fmadd_ps(load_values8<Fmt>(v + j), _mm256_i32gather_ps(x, clamped, 4), acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    float sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    for (; j < end; ++j) sum += Fmt::load(v[j]) * x[block_col(w, j, bad_tail)];
    y[i] = sum;
  }
  return bad_tail | !_mm256_testz_si256(bad, bad);
}
#endif  // SLIMRATE_X86_SIMD

// The widest of the CSR batch-1 kernels this CPU runs: AVX-512 or AVX2 gathers on x86-64, else the portable
// loop (NEON on aarch64).
template <class Fmt, class Index>
uint32_t spmv_csr_best(const Csr<Index>& w, const typename Fmt::storage* v, const float* x, float* y, int64_t lo,
                       int64_t hi) {
#if SLIMRATE_X86_SIMD
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                   __builtin_cpu_supports("avx512vl") ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
  if (level == 2) return spmv_csr_avx512<Fmt>(w, v, x, y, lo, hi);
  if (level == 1) return spmv_csr_avx2<Fmt>(w, v, x, y, lo, hi);
#endif
  return spmv_csr<Fmt>(w, v, x, y, lo, hi);
}

// r×c blocks, B = 1: y[i·r + a] = Σ_j Σ_k v[j][a][k]·x[col[j]·c + k].  R, C > 0 fix the block at compile
// time; 0 takes r, c at run time (any block shape).
template <class Fmt, class Index, int R, int C>
SLIMRATE_CPU_CLONES uint32_t spmv_block(const Csr<Index>& w, const typename Fmt::storage* v, const float* x, float* y,
                                        int64_t lo, int64_t hi, int r_rt, int c_rt) {
  const int r = R ? R : r_rt, c = C ? C : c_rt;
  uint32_t bad = 0;
  float acc[R ? R : kSparseMaxBlockRows];
  for (int64_t i = lo; i < hi; ++i) {
    for (int a = 0; a < r; ++a) acc[a] = 0.0f;
    for (int64_t j = w.row_ptr[i]; j < w.row_ptr[i + 1]; ++j) {
      const float* xs = x + int64_t{block_col(w, j, bad)} * c;
      const auto* vb = v + j * r * c;
      for (int a = 0; a < r; ++a) {
        float s = 0.0f;
        for (int k = 0; k < c; ++k) s += Fmt::load(vb[a * c + k]) * xs[k];
        acc[a] += s;
      }
    }
    for (int a = 0; a < r; ++a) y[i * r + a] = acc[a];
  }
  return bad;
}

constexpr int64_t kAhead = 256;        // blocks ahead for the weight prefetch
constexpr int64_t kRowsWork = 1 << 12;  // stored weights per sweep of rows over the tiles (~16-24 KiB, in L1)

// r×c blocks, B > 1, tiles of T batch columns: acc[u][a][t] += v[j+u][a][k]·xt[tile][col·c+k][t].
// U independent accumulator sets hide the FMA latency when r is small.  Block columns were range-checked
// by max_block_col before the call (an inline clamp per weight cost ~30% here, where the reads hit cache).
template <class Fmt, class Index, int R, int C, int T>
SLIMRATE_CPU_CLONES uint32_t spmm_rows(const Csr<Index>& w, const typename Fmt::storage* v, const float* xt,
                                       float* yt, int64_t ntiles, int64_t xrows, int64_t yrows, int64_t lo,
                                       int64_t hi, int r_rt, int c_rt) {
  constexpr int U = R == 0 ? 1 : (R >= 4 ? 1 : 4 / R);
  const int r = R ? R : r_rt, c = C ? C : c_rt;
  const int64_t rc = int64_t{r} * c;
  alignas(64) float acc[U][R ? R : kSparseMaxBlockRows][T];
  for (int64_t first = lo; first < hi;) {
    int64_t stop = first + 1;  // rows [first, stop) hold about kRowsWork stored weights
    while (stop < hi && (w.row_ptr[stop + 1] - w.row_ptr[first]) * rc <= kRowsWork) ++stop;
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const float* xs = xt + tile * xrows * T;
      float* ys = yt + tile * yrows * T;
      for (int64_t i = first; i < stop; ++i) {
        for (int u = 0; u < U; ++u)
          for (int a = 0; a < r; ++a)
            for (int t = 0; t < T; ++t) acc[u][a][t] = 0.0f;
        int64_t j = w.row_ptr[i];
        const int64_t end = w.row_ptr[i + 1];
        for (; j + U <= end; j += U) {
          // Stream the weights past the caches (non-temporal prefetch), so the x tile stays in L2.
          __builtin_prefetch(v + (j + kAhead) * rc, 0, 0);
          __builtin_prefetch(w.col_idx + j + kAhead, 0, 0);
          for (int u = 0; u < U; ++u) {
            const float* xb = xs + int64_t{w.col_idx[j + u]} * c * T;
            const auto* vb = v + (j + u) * rc;
            for (int a = 0; a < r; ++a)
              for (int k = 0; k < c; ++k) {
                float wv = Fmt::load(vb[a * c + k]);
#pragma omp simd
                for (int t = 0; t < T; ++t) acc[u][a][t] += wv * xb[k * T + t];
              }
          }
        }
        for (; j < end; ++j) {
          const float* xb = xs + int64_t{w.col_idx[j]} * c * T;
          const auto* vb = v + j * rc;
          for (int a = 0; a < r; ++a)
            for (int k = 0; k < c; ++k) {
              float wv = Fmt::load(vb[a * c + k]);
#pragma omp simd
              for (int t = 0; t < T; ++t) acc[0][a][t] += wv * xb[k * T + t];
            }
        }
        for (int a = 0; a < r; ++a)
#pragma omp simd
          for (int t = 0; t < T; ++t) {
            float sum = acc[0][a][t];
            for (int u = 1; u < U; ++u) sum += acc[u][a][t];
            ys[(i * r + a) * T + t] = sum;
          }
      }
    }
    first = stop;
  }
  return 0;
}

// What one parallel task needs: the matrix, x and y in the layout of `tile` (0 = batch-1 vectors).
template <class Index>
struct Task {
  Csr<Index> w;
  const float* xt;
  float* yt;
  int64_t tile, ntiles, xrows, yrows;
  int r, c;
};

// Runs block shape (R, C) (0 = run-time) over block rows [lo, hi).
template <class Fmt, class Index, int R, int C>
uint32_t run_rows(const Task<Index>& k, const typename Fmt::storage* v, int64_t lo, int64_t hi) {
  switch (k.tile) {
    case 0:
      if constexpr (R == 1 && C == 1) return spmv_csr_best<Fmt>(k.w, v, k.xt, k.yt, lo, hi);
      else return spmv_block<Fmt, Index, R, C>(k.w, v, k.xt, k.yt, lo, hi, k.r, k.c);
    case 8: return spmm_rows<Fmt, Index, R, C, 8>(k.w, v, k.xt, k.yt, k.ntiles, k.xrows, k.yrows, lo, hi, k.r, k.c);
    case 16: return spmm_rows<Fmt, Index, R, C, 16>(k.w, v, k.xt, k.yt, k.ntiles, k.xrows, k.yrows, lo, hi, k.r, k.c);
    default: return spmm_rows<Fmt, Index, R, C, 32>(k.w, v, k.xt, k.yt, k.ntiles, k.xrows, k.yrows, lo, hi, k.r, k.c);
  }
}

template <class Fmt, class Index>
uint32_t run_block_shape(const Task<Index>& k, const typename Fmt::storage* v, int64_t lo, int64_t hi) {
  // Compile-time block shapes (bench/bench_sparse.py compares them); any other shape runs the generic code.
#define SLIMRATE_BLOCK(R, C) \
  if (k.r == R && k.c == C) return run_rows<Fmt, Index, R, C>(k, v, lo, hi);
  SLIMRATE_BLOCK(1, 1)
  SLIMRATE_BLOCK(1, 4)
  SLIMRATE_BLOCK(1, 8)
  SLIMRATE_BLOCK(4, 1)
  SLIMRATE_BLOCK(8, 1)
  SLIMRATE_BLOCK(4, 4)
#undef SLIMRATE_BLOCK
  return run_rows<Fmt, Index, 0, 0>(k, v, lo, hi);
}

// The largest block column in col_idx[lo, hi) (0 when empty), vectorised.
template <class Index>
SLIMRATE_CPU_CLONES uint32_t max_block_col(const Index* col_idx, int64_t lo, int64_t hi) {
  uint32_t top = 0;
#pragma omp simd reduction(max : top)
  for (int64_t j = lo; j < hi; ++j) top = std::max(top, static_cast<uint32_t>(col_idx[j]));
  return top;
}

template <class Index>
Status run_kernel(const BlockCsr& m, const Task<Index>& task) {
  if (task.tile != 0 && m.nblocks > 0) {  // the batched kernels read block columns unchecked
    std::atomic<uint32_t> out_of_range{0};
    parallel_for(0, m.nblocks, int64_t{1} << 16, [&](int64_t lo, int64_t hi) {
      if (max_block_col(task.w.col_idx, lo, hi) > task.w.last) out_of_range = 1;
    });
    if (out_of_range.load()) return Status::bad_index;
  }
  // Grain: about 16 Ki stored weights per task keeps scheduling cheap and the threads balanced.
  int64_t per_row = std::max<int64_t>(1, m.nblocks * m.r * m.c / std::max<int64_t>(1, m.brows));
  int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / per_row);
  std::atomic<uint32_t> bad{0};
  with_f32_f16_format(m.format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    const auto* v = static_cast<const typename Fmt::storage*>(m.values);
    parallel_for(0, m.brows, grain,
                 [&](int64_t lo, int64_t hi) { bad |= run_block_shape<Fmt, Index>(task, v, lo, hi); });
  });
  return bad.load() ? Status::bad_index : Status::ok;
}

template <class Index>
Status matmul_with(const BlockCsr& m, const float* xt, float* yt, int64_t batch) {
  const int64_t tile = sparse_tile_width(batch), ntiles = tile == 0 ? 1 : (batch + tile - 1) / tile;
  const Csr<Index> w{m.row_ptr, static_cast<const Index*>(m.col_idx),
                     static_cast<uint32_t>(std::max<int64_t>(m.bcols, 1) - 1)};
  return run_kernel(m, Task<Index>{w, xt, yt, tile, ntiles, m.bcols * m.c, m.brows * m.r, static_cast<int>(m.r),
                                   static_cast<int>(m.c)});
}

}  // namespace

Status sparse_matmul(const BlockCsr& w, const float* xt, float* yt, int64_t batch) noexcept {
  return w.index == IndexFormat::i32 ? matmul_with<int32_t>(w, xt, yt, batch) : matmul_with<uint16_t>(w, xt, yt, batch);
}

}  // namespace slimrate::core

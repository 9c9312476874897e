// Bodies of the CTMC kernels of core/ctmc.h: loops written for the auto-vectoriser, cloned per x86 ISA
// (core/arch.h); setup.py's -fno-trapping-math lets GCC if-convert the selects of the closed forms.
//
// Transition rows are computed in rank order from rank(x0) on (the entries below are 0) and scattered into state
// order; rate columns and the score entropy run in state order, so their rows are read and written contiguously,
// from per-position tables built once per call (O(L·V)): rank[l, y] = perm[l, y] (int32 for float32, so rank
// compares share the float lanes), and Λ and the inflow rate a_{j−1} of each state gathered into state order. The
// closed forms (kernels/ctmc.h) are written as float selects so GCC vectorises them; `objdump -d` of the x86-64-v4
// clones shows zmm code for every loop. The transition-row backward runs in rank order (the order of lam and its
// gradient) over tasks of one position and a chunk of the batch; each task writes its own partial dlam row, summed
// in chunk order.
#include "core/ctmc.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "core/arch.h"
#include "core/parallel.h"
#include "kernels/ctmc.h"

namespace slimrate::core {
namespace {

template <class T>
using RankInt = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;

// Rows are processed in blocks of one AVX-512 vector (16 float32 / 8 float64): a row of V = 27 would otherwise
// run 11 of its 27 entries through the scalar epilogue, one lane of the polynomials at a time.  Rows are padded
// to Vp, a multiple of kLanes, and rows with V ≠ Vp go through per-task buffers.
template <class T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <class T>
int64_t padded_width(int64_t V) { return (V + kLanes<T> - 1) / kLanes<T> * kLanes<T>; }

// Position l and batch index b of flat rows i = b·L + l, advanced without a division per row (a 64-bit
// division costs tens of cycles, as much as the closed form of a V = 27 row).
struct RowCursor {
  int64_t b, l, L;
  RowCursor(int64_t i, int64_t L_) : b(i / L_), l(i % L_), L(L_) {}
  void next() {
    if (++l == L) {
      l = 0;
      ++b;
    }
  }
};

// About 16 Ki output elements per task: enough work to amortise scheduling, small enough to balance.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 14) / V); }

// State-order tables of one call, rows padded to Vp: [L, Vp] each.  Padding entries have an impossible rank,
// so they are below no k and equal to no k0: they add nothing to a score and are never copied out.
template <class T>
struct Tables {
  int64_t Vp;
  std::vector<RankInt<T>> rank;
  std::vector<T> lam_s;   // Λ_{rank[y]}
  std::vector<T> rate_s;  // a_{rank[y]−1} = Λ_{rank[y]} − Λ_{rank[y]−1}: the rate into y from each lower rank
                          // (0 at rank 0)
};

template <class T>
Tables<T> build_tables(const CtmcStructure<T>& s) {
  const int64_t L = s.L, V = s.V, Vp = padded_width<T>(V);
  Tables<T> t{Vp, std::vector<RankInt<T>>(L * Vp, std::numeric_limits<RankInt<T>>::max()), std::vector<T>(L * Vp),
              std::vector<T>(L * Vp)};
  const T* lam = s.lam;
  const int64_t* perm = s.perm;
  parallel_for(0, L, std::max<int64_t>(1, 4096 / V), [&](int64_t lo, int64_t hi) {
    for (int64_t l = lo; l < hi; ++l) {
      for (int64_t y = 0; y < V; ++y) {
        const int64_t j = perm[l * V + y];
        const T* row = lam + l * V;
        t.rank[l * Vp + y] = static_cast<RankInt<T>>(j);
        t.lam_s[l * Vp + y] = row[j];
        t.rate_s[l * Vp + y] = j > 0 ? row[j] - row[j - 1] : T(0);
      }
    }
  });
  return t;
}

// A row's Vp entries: the tensor's row itself when V = Vp, else a per-task buffer (zero-padded on load).
template <class T>
struct RowBuffer {
  std::vector<T> buf;
  bool direct;
  RowBuffer(int64_t V, int64_t Vp) : buf(V == Vp ? 0 : Vp, T(0)), direct(V == Vp) {}
  const T* load(const T* src, int64_t V) {
    if (direct) return src;
    std::copy(src, src + V, buf.data());
    return buf.data();
  }
  T* target(T* dst) { return direct ? dst : buf.data(); }
  void store(T* dst, int64_t V) const {
    if (!direct) std::copy(buf.data(), buf.data() + V, dst);
  }
};

// ---- transition rows: out[b, l, y] = p(y | x0[b, l]) after time h[b] ----

// Rank-order tables of one call, [L, Vp] each, zero past V: Λ_j and a_{j−1} = Λ_j − Λ_{j−1} (0 at j = 0).
template <class T>
struct RankTables {
  int64_t Vp;
  std::vector<T> lam, rate;
};

template <class T>
RankTables<T> build_rank_tables(const CtmcStructure<T>& s) {
  const int64_t L = s.L, V = s.V, Vp = padded_width<T>(V);
  RankTables<T> t{Vp, std::vector<T>(L * Vp, T(0)), std::vector<T>(L * Vp, T(0))};
  const T* lam = s.lam;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t j = 0; j < V; ++j) {
      t.lam[l * Vp + j] = lam[l * V + j];
      t.rate[l * Vp + j] = j > 0 ? lam[l * V + j] - lam[l * V + j - 1] : T(0);
    }
  }
  return t;
}

// Rows in rank order from the vector block holding k0 = rank(x0) (entries below k0 are 0: on average half the
// row is skipped), then scattered into state order through perm_inv.
template <class T>
SLIMRATE_CPU_CLONES void transition_rows_span(const int64_t* x0, const T* h, const RankTables<T>& rt,
                                              const int64_t* perm, const int64_t* perm_inv, T* out, int64_t L,
                                              int64_t V, int64_t lo, int64_t hi) {
  using Math = typename PolyMathFor<T>::type;
  constexpr int64_t W = kLanes<T>;
  const int64_t Vp = rt.Vp;
  std::vector<T> p(Vp);
  RowCursor at(lo, L);
  for (int64_t i = lo; i < hi; ++i, at.next()) {
    const int64_t l = at.l;
    const T* lam = rt.lam.data() + l * Vp;
    const T* rate = rt.rate.data() + l * Vp;
    const RankInt<T> k0 = static_cast<RankInt<T>>(perm[l * V + x0[i]]);
    const T hb = h[at.b];
    for (int64_t j0 = k0 / W * W; j0 < Vp; j0 += W) {
#pragma omp simd
      for (int64_t j = j0; j < j0 + W; ++j) {
        p[j] = transition_prob<Math>(hb, lam[j], rate[j], static_cast<RankInt<T>>(j), k0);
      }
    }
    T* o = out + i * V;
    std::fill(o, o + V, T(0));
    const int64_t* inv = perm_inv + l * V;
    for (int64_t j = k0; j < V; ++j) o[inv[j]] = p[j];
  }
}

// The sum of W per-lane partial sums by halving: a dependency chain of log2(W) adds instead of W (GCC adds the
// lanes of an `omp simd reduction` or a plain loop one by one; at V = 27 that chain took 14–45% of a row).
template <class T, int64_t W>
inline T lane_sum(T (&acc)[W]) {
  for (int64_t w = W / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

// ---- its backward: dlam [L, V] and dh [B] from grad [B, L, V] ----

// One row in rank order from the vector block holding k0: dlam[j] += h·c_j, returns Σ_j Λ_j·c_j.
// lam and g_rank are padded with zeros past V (g_rank to Vp + 1), dlam to Vp.
template <class T>
SLIMRATE_CPU_CLONES T transition_backward_row(const T* lam, const T* g_rank, T hb, int64_t k0, int64_t Vp, T* dlam) {
  using Math = typename PolyMathFor<T>::type;
  constexpr int64_t W = kLanes<T>;
  T acc[W] = {};
  for (int64_t j0 = k0 / W * W; j0 < Vp; j0 += W) {
#pragma omp simd
    for (int64_t y = 0; y < W; ++y) {
      const int64_t j = j0 + y;
      T c = transition_backward_coef<Math>(hb, lam[j], g_rank[j], g_rank[j + 1], j, k0);
      dlam[j] += hb * c;
      acc[y] += lam[j] * c;
    }
  }
  return lane_sum(acc);
}

// ---- rate columns: out[b, l, y] = Q[y, x[b, l]] ----

template <class T>
SLIMRATE_CPU_CLONES void rate_cols_span(const int64_t* x, const T* lam, const Tables<T>& tb, T* out, int64_t L,
                                        int64_t V, int64_t lo, int64_t hi) {
  constexpr int64_t W = kLanes<T>;
  const int64_t Vp = tb.Vp;
  RowBuffer<T> ob(V, Vp);
  RowCursor at(lo, L);
  for (int64_t i = lo; i < hi; ++i, at.next()) {
    const int64_t l = at.l;
    const RankInt<T>* rank = tb.rank.data() + l * Vp;
    const int64_t xi = x[i];
    const RankInt<T> k = rank[xi];
    const T rate_k = tb.rate_s[l * Vp + xi], lam_k = lam[l * V + k];
    T* o = ob.target(out + i * V);
    for (int64_t y0 = 0; y0 < Vp; y0 += W) {
#pragma omp simd
      for (int64_t y = y0; y < y0 + W; ++y) o[y] = rate_into(rank[y], k, rate_k, lam_k);
    }
    ob.store(out + i * V, V);
  }
}

// ---- score entropy: loss [B] and, when asked, d loss[b] / d logscore[b] [B, L, V] ----

// Rows [lo, hi): loss_row[i] = w·Σ_y term_y, grad row = w·(e^s − r) on active y.  Returns the first row
// whose x_t cannot be reached from x0 (p(x_t|x0) = 0 with a nonzero weight), or −1.
template <class T, bool kWithGrad>
SLIMRATE_CPU_CLONES int64_t score_entropy_span(const T* ls, const int64_t* x_t, const int64_t* x0, const T* h,
                                               const T* sigma, const Tables<T>& tb, T* loss_row, T* grad, int64_t L,
                                               int64_t V, int64_t lo, int64_t hi) {
  using Math = typename PolyMathFor<T>::type;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int64_t W = kLanes<T>;
  const int64_t Vp = tb.Vp;
  RowBuffer<T> sb(V, Vp), gb(V, Vp);
  int64_t bad = -1;
  RowCursor at(lo, L);
  for (int64_t i = lo; i < hi; ++i, at.next()) {
    const int64_t b = at.b, row = at.l * Vp, xt = x_t[i];
    const RankInt<T>* rank = tb.rank.data() + row;
    const T* lam_s = tb.lam_s.data() + row;
    const T* rate_s = tb.rate_s.data() + row;
    const RankInt<T> k = rank[xt], k0 = rank[x0[i]];
    const T hb = h[b], w = sigma[b] * rate_s[xt];  // σ·a_{k−1}: the same rate into x_t from every lower rank
    const T logp_k = log_transition_prob<Math>(hb, lam_s[xt], rate_s[xt], k, k0, kNegInf);
    if (w == T(0) || k == 0 || k < k0 || logp_k == kNegInf) {
      // No state has a (weighted) rate into x_t, so the row adds nothing; or x_t is unreachable (reported).
      if (w != T(0) && k != 0 && bad < 0) bad = i;
      loss_row[i] = 0;
      if constexpr (kWithGrad) std::fill(grad + i * V, grad + (i + 1) * V, T(0));
      continue;
    }
    const T* s = sb.load(ls + i * V, V);
    T* g = kWithGrad ? gb.target(grad + i * V) : nullptr;
    T acc[W] = {};  // per-lane partial sums, added across lanes once per row
    for (int64_t y0 = 0; y0 < Vp; y0 += W) {
#pragma omp simd
      for (int64_t y = 0; y < W; ++y) {
        ScoreTerm<T> t = score_entropy_term<Math>(s[y0 + y], hb, lam_s[y0 + y], rate_s[y0 + y], rank[y0 + y], k0, k,
                                                  logp_k);
        acc[y] += t.loss;
        if constexpr (kWithGrad) g[y0 + y] = w * t.grad;
      }
    }
    if constexpr (kWithGrad) gb.store(grad + i * V, V);
    loss_row[i] = w * lane_sum(acc);
  }
  return bad;
}

}  // namespace

template <class T>
Status ctmc_transition_rows(const CtmcStructure<T>& s, const int64_t* x0, const T* h, int64_t B, T* out) noexcept {
  try {
    const RankTables<T> rt = build_rank_tables(s);
    return try_parallel_for(0, B * s.L, row_grain(s.V), [&](int64_t lo, int64_t hi) {
      transition_rows_span<T>(x0, h, rt, s.perm, s.perm_inv, out, s.L, s.V, lo, hi);
    });
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

template <class T>
Status ctmc_transition_rows_backward(const CtmcStructure<T>& s, const T* grad, const int64_t* x0, const T* h,
                                     int64_t B, T* dlam, T* dh) noexcept {
  const int64_t L = s.L, V = s.V;
  // Batch chunks per position: enough tasks for the threads when L is small, chosen from the shape alone.
  const int64_t chunks = std::clamp<int64_t>((64 + L - 1) / std::max<int64_t>(L, 1), 1, std::max<int64_t>(B, 1));
  const int64_t per_chunk = (B + chunks - 1) / std::max<int64_t>(chunks, 1);
  try {
    const RankTables<T> rt = build_rank_tables(s);  // Λ as [L, Vp], zeros past V
    const int64_t Vp = rt.Vp;
    std::vector<T> dlam_part(chunks * L * Vp, T(0)), dh_row(B * L);
    const T* lp = rt.lam.data();
    const Status status = try_parallel_for(
        0, chunks * L, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, per_chunk * V)),
        [&](int64_t lo, int64_t hi) {
          std::vector<T> g_rank(Vp + 1, T(0));  // G' in rank order, zero past V
          for (int64_t task = lo; task < hi; ++task) {
            const int64_t c = task / L, l = task % L;
            const int64_t* inv = s.perm_inv + l * V;
            for (int64_t b = c * per_chunk; b < std::min(B, (c + 1) * per_chunk); ++b) {
              const int64_t i = b * L + l;
              const T* g = grad + i * V;
              const int64_t k0 = s.perm[l * V + x0[i]];
              // G' for the ranks the row reads: from the vector block holding k0 on.
              for (int64_t j = k0 / kLanes<T> * kLanes<T>; j < V; ++j) g_rank[j] = g[inv[j]];
              dh_row[i] = transition_backward_row<T>(lp + l * Vp, g_rank.data(), h[b], k0, Vp,
                                                      dlam_part.data() + task * Vp);
            }
          }
        });
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j < V; ++j) {
        T sum = dlam_part[l * Vp + j];
        for (int64_t c = 1; c < chunks; ++c) sum += dlam_part[(c * L + l) * Vp + j];
        dlam[l * V + j] = sum;
      }
    for (int64_t b = 0; b < B; ++b) {
      double sum = 0.0;
      for (int64_t l = 0; l < L; ++l) sum += dh_row[b * L + l];
      dh[b] = static_cast<T>(sum);
    }
    return status;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

template <class T>
Status ctmc_rate_cols(const CtmcStructure<T>& s, const int64_t* x, int64_t B, T* out) noexcept {
  try {
    const Tables<T> tb = build_tables(s);
    return try_parallel_for(0, B * s.L, row_grain(s.V), [&](int64_t lo, int64_t hi) {
      rate_cols_span<T>(x, s.lam, tb, out, s.L, s.V, lo, hi);
    });
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

template <class T>
Status score_entropy(const CtmcStructure<T>& s, const T* logscore, const int64_t* x_t, const int64_t* x0, const T* h,
                     const T* sigma, int64_t B, T* loss, T* grad, int64_t* unreachable) noexcept {
  const int64_t L = s.L, V = s.V;
  try {
    const Tables<T> tb = build_tables(s);
    std::vector<T> loss_row(B * L);
    std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
    const Status status = try_parallel_for(0, B * L, row_grain(V), [&](int64_t lo, int64_t hi) {
      const int64_t first =
          grad ? score_entropy_span<T, true>(logscore, x_t, x0, h, sigma, tb, loss_row.data(), grad, L, V, lo, hi)
               : score_entropy_span<T, false>(logscore, x_t, x0, h, sigma, tb, loss_row.data(), nullptr, L, V, lo,
                                              hi);
      if (first >= 0) {
        int64_t cur = bad.load();
        while (first < cur && !bad.compare_exchange_weak(cur, first)) {
        }
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      double sum = 0.0;
      for (int64_t l = 0; l < L; ++l) sum += loss_row[b * L + l];
      loss[b] = static_cast<T>(sum);
    }
    *unreachable = bad.load() == std::numeric_limits<int64_t>::max() ? -1 : bad.load();
    return status;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

#define SLIMRATE_CTMC_INSTANCES(T)                                                                                   \
  template Status ctmc_transition_rows<T>(const CtmcStructure<T>&, const int64_t*, const T*, int64_t, T*) noexcept; \
  template Status ctmc_transition_rows_backward<T>(const CtmcStructure<T>&, const T*, const int64_t*, const T*,     \
                                                   int64_t, T*, T*) noexcept;                                        \
  template Status ctmc_rate_cols<T>(const CtmcStructure<T>&, const int64_t*, int64_t, T*) noexcept;                 \
  template Status score_entropy<T>(const CtmcStructure<T>&, const T*, const int64_t*, const int64_t*, const T*,     \
                                   const T*, int64_t, T*, T*, int64_t*) noexcept;
SLIMRATE_CTMC_INSTANCES(float)
SLIMRATE_CTMC_INSTANCES(double)
#undef SLIMRATE_CTMC_INSTANCES

}  // namespace slimrate::core

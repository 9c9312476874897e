// Torch-free pieces of the chunked tensor codec (slim_encode / slim_decode; docs/slim-format.md): the fused
// quantize + check + count pass over one chunk of a tensor, and the "eg" frequency table built from the
// chunks' counts.  The coders themselves are entropy_eg.h and entropy_rans.h.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/entropy_rans.h"

namespace slimrate {

// |x/Δ| must stay below 2^31 − 1 (ops.quantize), so round(x/Δ) is an int32 and never INT32_MIN.
constexpr double kQuantizeLimit = 2147483647.0;
// The fused pass quantizes this many elements at a time and counts them while they are in L1.
constexpr int64_t kQuantizeBlock = 4096;
// SymbolCounter keeps a dense histogram while the chunk's symbols span at most this many values (512 KiB of
// counters); quantized weights span a few hundred.
constexpr int64_t kCounterDenseRange = int64_t{1} << 16;

// Distinct symbols (ascending) and their counts.
struct SymbolCounts {
  std::vector<int32_t> alphabet;
  std::vector<int64_t> counts;
};

// Counts the symbols of one chunk block by block: a dense histogram over the range seen so far, grown as
// needed; once that range exceeds kCounterDenseRange, counting is left to finish() (count_symbols).
class SymbolCounter {
 public:
  void add(const int32_t* q, int64_t n, int32_t lo, int32_t hi) {
    if (too_wide_ || n == 0) return;
    if (!cover(lo, hi)) {
      too_wide_ = true;
      return;
    }
    int64_t* h = hist_.data();
    const int64_t base = lo_;
    for (int64_t i = 0; i < n; ++i) ++h[q[i] - base];
  }

  // The counts of q[0, n), the whole chunk that was add()ed block by block.
  SymbolCounts finish(const int32_t* q, int64_t n) const {
    SymbolCounts out;
    if (too_wide_) {
      count_symbols(q, n, out.alphabet, out.counts);
      return out;
    }
    for (size_t v = 0; v < hist_.size(); ++v)
      if (hist_[v]) {
        out.alphabet.push_back(static_cast<int32_t>(lo_ + static_cast<int64_t>(v)));
        out.counts.push_back(hist_[v]);
      }
    return out;
  }

 private:
  // Grows the histogram to [min(lo, lo_), max(hi, top)]; false when that is wider than kCounterDenseRange.
  bool cover(int64_t lo, int64_t hi) {
    int64_t top = lo_ + static_cast<int64_t>(hist_.size()) - 1;
    if (!hist_.empty() && lo >= lo_ && hi <= top) return true;
    int64_t new_lo = hist_.empty() ? lo : std::min(lo, lo_);
    int64_t new_hi = hist_.empty() ? hi : std::max(hi, top);
    if (new_hi - new_lo + 1 > kCounterDenseRange) return false;
    std::vector<int64_t> grown(new_hi - new_lo + 1, 0);
    std::copy(hist_.begin(), hist_.end(), grown.begin() + (lo_ - new_lo));
    hist_ = std::move(grown);
    lo_ = new_lo;
    return true;
  }

  std::vector<int64_t> hist_;  // hist_[v] = count of lo_ + v
  int64_t lo_ = 0;
  bool too_wide_ = false;
};

// x[i] as a float64, read through Fmt (portable.h): exact, every float16, bfloat16 and float32 is a float64.
template <class Fmt>
inline double load_f64(typename Fmt::storage v) { return static_cast<double>(Fmt::load(v)); }

// q[i] = round(x[i]/step) for i < n, ties to even: std::nearbyint in the default rounding mode, as torch.round
// on float64, of the float64 quotient.  *lo, *hi = min and max of q.  Returns false when some |x[i]/step| is
// not below kQuantizeLimit (NaN and ±inf fail the comparison too); q[i] = 0 there.  No early exit, and an int
// (not a bool) collects the failures: GCC 12 vectorises the loop only so.
template <class Fmt>
inline bool quantize_block(const typename Fmt::storage* x, int64_t n, double step, int32_t* q, int32_t* lo,
                           int32_t* hi) {
  int32_t bad = 0;
  int32_t mn = INT32_MAX, mx = INT32_MIN;
  for (int64_t i = 0; i < n; ++i) {
    double y = load_f64<Fmt>(x[i]) / step;
    bool fits = std::fabs(y) < kQuantizeLimit;
    bad |= !fits;
    int32_t v = static_cast<int32_t>(std::nearbyint(fits ? y : 0.0));
    q[i] = v;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  *lo = mn;
  *hi = mx;
  return bad == 0;
}

// q·step as the decoder stores it: the float64 product rounded once to Fmt (through float32 for the 16-bit
// formats, as torch's .to(dtype)).
template <class Fmt>
inline typename Fmt::storage dequantize_one(int32_t q, double step) {
  return Fmt::store(static_cast<typename Fmt::compute>(static_cast<double>(q) * step));
}

template <class Fmt>
inline bool dequantizes_finite(int32_t q, double step) {
  return std::isfinite(load_f64<Fmt>(dequantize_one<Fmt>(q, step)));
}

// Whether every q in [lo, hi] dequantizes to a finite value: the rounding is monotone, so the ends decide.
template <class Fmt>
inline bool range_dequantizes_finite(int32_t lo, int32_t hi, double step) {
  return dequantizes_finite<Fmt>(lo, step) && dequantizes_finite<Fmt>(hi, step);
}

// Whether x has a symbol whose q·step is finite in Fmt (what the fused pass checks, one element at a time).
template <class Fmt>
inline bool quantizes_finitely(typename Fmt::storage x, double step) {
  double y = load_f64<Fmt>(x) / step;
  return std::fabs(y) < kQuantizeLimit && dequantizes_finite<Fmt>(static_cast<int32_t>(std::nearbyint(y)), step);
}

// The index of the first element of x that quantizes_finitely refuses; the caller knows there is one (a failed
// block), so this runs only on failure.
template <class Fmt>
__attribute__((noinline)) int64_t first_refused(const typename Fmt::storage* x, double step) {
  int64_t i = 0;
  while (quantizes_finitely<Fmt>(x[i], step)) ++i;
  return i;
}

// The fused pass over one chunk x[0, n): quantize into q[0, n) and, when counter is given, count the symbols.
// Returns the index of the first element without a symbol (non-finite, or |x/step| ≥ 2^31 − 1) or whose q·step
// overflows Fmt (e.g. float16 65504 with step 2^15: q = 2, q·step = 65536), or -1.  The block's extremes
// decide the overflow check; the elements are searched only on failure.  Always inlined: the CPU glue compiles
// its caller once per instruction set (target_clones), and a call out of it would run the baseline x86-64 code
// (measured: encode 25-40% slower).
template <class Fmt>
__attribute__((always_inline)) inline int64_t quantize_chunk(const typename Fmt::storage* x, int64_t n, double step,
                                                             int32_t* q, SymbolCounter* counter) {
  for (int64_t b = 0; b < n; b += kQuantizeBlock) {
    int64_t len = std::min(kQuantizeBlock, n - b);
    int32_t lo, hi;
    if (!quantize_block<Fmt>(x + b, len, step, q + b, &lo, &hi) || !range_dequantizes_finite<Fmt>(lo, hi, step))
      return b + first_refused<Fmt>(x + b, step);
    if (counter) counter->add(q + b, len, lo, hi);
  }
  return -1;
}

// Σ of the chunks' counts: one ascending alphabet.
inline SymbolCounts merge_counts(const std::vector<SymbolCounts>& parts) {
  std::vector<std::pair<int32_t, int64_t>> all;
  for (const SymbolCounts& p : parts)
    for (size_t i = 0; i < p.alphabet.size(); ++i) all.emplace_back(p.alphabet[i], p.counts[i]);
  std::sort(all.begin(), all.end());
  SymbolCounts out;
  for (size_t i = 0; i < all.size(); ++i) {
    if (i == 0 || all[i].first != all[i - 1].first) {
      out.alphabet.push_back(all[i].first);
      out.counts.push_back(0);
    }
    out.counts.back() += all[i].second;
  }
  return out;
}

// The "eg" table (docs/slim-format.md §6): the distinct symbols by descending count, ties by smaller value.
struct EgTable {
  std::vector<int32_t> values;    // values[r] has rank r
  std::vector<int32_t> alphabet;  // ascending
  std::vector<uint32_t> rank_of;  // rank of alphabet[i]
};

inline EgTable eg_table(SymbolCounts total) {
  const size_t m = total.alphabet.size();
  std::vector<uint32_t> order(m);
  for (size_t i = 0; i < m; ++i) order[i] = static_cast<uint32_t>(i);
  // stable: equal counts keep the ascending order of the alphabet
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return total.counts[a] > total.counts[b]; });
  EgTable t;
  t.values.resize(m);
  t.rank_of.resize(m);
  for (size_t r = 0; r < m; ++r) {
    t.values[r] = total.alphabet[order[r]];
    t.rank_of[order[r]] = static_cast<uint32_t>(r);
  }
  t.alphabet = std::move(total.alphabet);
  return t;
}

}  // namespace slimrate

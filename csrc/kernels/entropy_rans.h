// Torch-free static rANS coder for int32 symbol streams: one self-contained buffer =
// header (alphabet + quantized frequencies) + rANS stream.  The coder is the byte-wise rANS of
// J. Duda, "Asymmetric numeral systems" (arXiv:1311.2540), in the construction of F. Giesen's
// ryg_rans (rans_byte.h): 32-bit state x ∈ [L, 2^31), L = 2^23, bytes shifted out/in one at a time;
// symbols are encoded last-to-first so the decoder reads the buffer forwards.
//
// Layout (varint = unsigned LEB128, at most 10 bytes):
//   byte mode (0 = rANS, 1 = raw), varint count,
//   mode 0: byte scale_bits, varint m (distinct symbols), varint zigzag64(smallest symbol),
//           m−1 varints (gap to the next symbol − 1), m varints (freq − 1), Σ freq = 2^scale_bits,
//           then 4 bytes of final state (little-endian) and the renormalisation bytes;
//   mode 1: count int32 little-endian (when more than half the symbols are distinct the header would
//           cost more than the symbols, or the alphabet exceeds kRansMaxAlphabet).
// A decoder consumes exactly the bytes the encoder wrote and ends in state L, so any truncation is
// detected; every header field is range-checked before it sizes an allocation or an index, and the whole
// header and the stream's length are checked before `count` symbols are (RansDecoder::open).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <queue>
#include <utility>
#include <vector>

namespace slimrate {

constexpr uint32_t kRansL = uint32_t{1} << 23;
// 16-bit frequencies: payload within 0.02% of n·H on rounded N(0, σ²) streams, σ = 1…50, 10^5–10^6 symbols;
// larger alphabets get scale_bits = ⌈log2 m⌉ + 1 so every symbol keeps freq ≥ 1, up to L's 23 bits.
constexpr int kRansDefaultScaleBits = 16;
constexpr int kRansMaxScaleBits = 23;
constexpr int64_t kRansMaxAlphabet = int64_t{1} << (kRansMaxScaleBits - 1);
// Dense symbol→index tables are used when the value range is at most this (else binary search).
constexpr int64_t kRansDenseRange = int64_t{1} << 24;

enum class RansStatus { kOk, kTruncated, kBadHeader, kCountMismatch, kTooShort, kBadStream };

// What a decoder error means, for messages.
inline const char* rans_status_reason(RansStatus st) {
  switch (st) {
    case RansStatus::kTruncated: return "truncated rANS buffer";
    case RansStatus::kBadHeader: return "corrupt rANS header (bad alphabet or frequencies)";
    case RansStatus::kCountMismatch: return "the rANS buffer holds another number of symbols";
    case RansStatus::kTooShort:
      return "the rANS stream is too short for its count of symbols with its frequency table (a wrong count)";
    case RansStatus::kBadStream: return "corrupt rANS stream (wrong final state or trailing bytes)";
    default: return "ok";
  }
}

// ---- varints -------------------------------------------------------------------------------------

inline void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<uint8_t>(v));
}

inline uint64_t zigzag64(int64_t v) { return v >= 0 ? uint64_t(v) << 1 : ((uint64_t(-(v + 1))) << 1) | 1; }
inline int64_t unzigzag64(uint64_t u) { return (u & 1) ? -int64_t(u >> 1) - 1 : int64_t(u >> 1); }

// Bounds-checked reader over buf[0, size).
struct ByteReader {
  const uint8_t* p;
  const uint8_t* end;
  bool ok = true;  // false once a read ran past the end or a varint overflowed 64 bits

  uint8_t byte() {
    if (p >= end) {
      ok = false;
      return 0;
    }
    return *p++;
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b = byte();
      if (!ok) return 0;
      if (shift == 63 && b > 1) {  // the 10th byte holds bit 63 only: more would wrap past 2^64
        ok = false;
        return 0;
      }
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    ok = false;
    return 0;
  }
  int64_t left() const { return end - p; }
};

// ---- model ---------------------------------------------------------------------------------------

struct RansModel {
  int scale_bits = kRansDefaultScaleBits;
  std::vector<int32_t> alphabet;  // distinct symbols, ascending
  std::vector<uint32_t> freq, start;
};

// Distinct symbols (ascending) and their counts.
inline void count_symbols(const int32_t* s, int64_t n, std::vector<int32_t>& alphabet, std::vector<int64_t>& counts) {
  alphabet.clear();
  counts.clear();
  if (n == 0) return;
  auto [lo_it, hi_it] = std::minmax_element(s, s + n);
  int64_t lo = *lo_it, range = int64_t(*hi_it) - lo + 1;
  if (range <= std::max<int64_t>(4 * n, 1 << 16) && range <= kRansDenseRange) {
    std::vector<int64_t> hist(range, 0);
    for (int64_t i = 0; i < n; ++i) ++hist[s[i] - lo];
    for (int64_t v = 0; v < range; ++v)
      if (hist[v]) {
        alphabet.push_back(static_cast<int32_t>(lo + v));
        counts.push_back(hist[v]);
      }
    return;
  }
  std::vector<int32_t> sorted(s, s + n);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || sorted[i] != sorted[i - 1]) {
      alphabet.push_back(sorted[i]);
      counts.push_back(0);
    }
    ++counts.back();
  }
}

// Frequencies summing to 2^scale_bits, each ≥ 1, close to counts·2^scale_bits/n: rounded, then the
// surplus or deficit moved one unit at a time where it costs the fewest bits (Σ c·log2 f changes least).
inline std::vector<uint32_t> normalize_freqs(const std::vector<int64_t>& counts, int64_t n, int scale_bits) {
  const int64_t total = int64_t{1} << scale_bits;
  size_t m = counts.size();
  std::vector<uint32_t> f(m);
  int64_t sum = 0;
  for (size_t i = 0; i < m; ++i) {
    f[i] = static_cast<uint32_t>(std::max<int64_t>(1, std::llround(double(counts[i]) * total / double(n))));
    sum += f[i];
  }
  using Item = std::pair<double, size_t>;  // (bits saved or lost by the move, symbol)
  if (sum > total) {  // take units away where log2(f/(f−1))·c is smallest
    auto cost = [&](size_t i) { return double(counts[i]) * std::log2(double(f[i]) / (f[i] - 1)); };
    std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
    for (size_t i = 0; i < m; ++i)
      if (f[i] > 1) heap.push({cost(i), i});
    for (; sum > total; --sum) {
      size_t i = heap.top().second;
      heap.pop();
      if (--f[i] > 1) heap.push({cost(i), i});
    }
  } else if (sum < total) {  // give units where log2((f+1)/f)·c is largest
    auto gain = [&](size_t i) { return double(counts[i]) * std::log2(double(f[i] + 1) / f[i]); };
    std::priority_queue<Item> heap;
    for (size_t i = 0; i < m; ++i) heap.push({gain(i), i});
    for (; sum < total; ++sum) {
      size_t i = heap.top().second;
      heap.pop();
      ++f[i];
      heap.push({gain(i), i});
    }
  }
  return f;
}

inline int rans_scale_bits(size_t m) {
  int bits = kRansDefaultScaleBits;
  while ((size_t{1} << (bits - 1)) < m) ++bits;  // 2^scale_bits ≥ 2m
  return bits;
}

inline void fill_starts(RansModel& model) {
  model.start.resize(model.freq.size());
  uint32_t acc = 0;
  for (size_t i = 0; i < model.freq.size(); ++i) {
    model.start[i] = acc;
    acc += model.freq[i];
  }
}

// ---- encoder -------------------------------------------------------------------------------------

// Maps a symbol to its alphabet index: a dense table over the value range, or binary search.
class SymbolIndex {
 public:
  explicit SymbolIndex(const std::vector<int32_t>& alphabet) : alphabet_(alphabet) {
    if (alphabet.empty()) return;
    lo_ = alphabet.front();
    int64_t range = int64_t(alphabet.back()) - lo_ + 1;
    if (range <= std::max<int64_t>(4 * int64_t(alphabet.size()), 1 << 16) && range <= kRansDenseRange) {
      dense_.assign(range, 0);
      for (size_t i = 0; i < alphabet.size(); ++i) dense_[alphabet[i] - lo_] = static_cast<uint32_t>(i);
    }
  }
  uint32_t operator()(int32_t s) const {
    if (!dense_.empty()) return dense_[s - lo_];
    return static_cast<uint32_t>(std::lower_bound(alphabet_.begin(), alphabet_.end(), s) - alphabet_.begin());
  }

 private:
  const std::vector<int32_t>& alphabet_;
  int64_t lo_ = 0;
  std::vector<uint32_t> dense_;
};

inline void put_header(std::vector<uint8_t>& out, const RansModel& model, int64_t n) {
  out.push_back(0);
  put_varint(out, uint64_t(n));
  out.push_back(static_cast<uint8_t>(model.scale_bits));
  put_varint(out, model.alphabet.size());
  if (model.alphabet.empty()) return;
  put_varint(out, zigzag64(model.alphabet[0]));
  for (size_t i = 1; i < model.alphabet.size(); ++i)
    put_varint(out, uint64_t(int64_t(model.alphabet[i]) - model.alphabet[i - 1] - 1));
  for (uint32_t f : model.freq) put_varint(out, f - 1);
}

// The whole buffer for symbols[0, n), given their distinct symbols (ascending) and counts as count_symbols
// returns them; header_bytes = bytes before the rANS state (or raw data).
inline std::vector<uint8_t> rans_encode_counted(const int32_t* s, int64_t n, std::vector<int32_t> alphabet,
                                                const std::vector<int64_t>& counts, int64_t* header_bytes) {
  RansModel model;
  model.alphabet = std::move(alphabet);
  std::vector<uint8_t> out;
  int64_t m = static_cast<int64_t>(model.alphabet.size());
  if (2 * m > n + 1 || m > kRansMaxAlphabet) {  // raw: the alphabet alone would outweigh the symbols
    out.push_back(1);
    put_varint(out, uint64_t(n));
    *header_bytes = static_cast<int64_t>(out.size());
    size_t at = out.size();
    out.resize(at + 4 * size_t(n));
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u = static_cast<uint32_t>(s[i]);
      for (int b = 0; b < 4; ++b) out[at + 4 * i + b] = static_cast<uint8_t>(u >> (8 * b));
    }
    return out;
  }
  model.scale_bits = rans_scale_bits(model.alphabet.size());
  if (m > 0) model.freq = normalize_freqs(counts, n, model.scale_bits);
  fill_starts(model);
  put_header(out, model, n);
  *header_bytes = static_cast<int64_t>(out.size());

  // Per symbol at most ⌈scale_bits/8⌉ renormalisation bytes (x < 2^31 shrinks below 2^(31−scale_bits)).
  const int sb = model.scale_bits;
  std::vector<uint8_t> stream(size_t(n) * ((sb + 7) / 8) + 4);
  uint8_t* ptr = stream.data() + stream.size();
  uint32_t x = kRansL;
  SymbolIndex index(model.alphabet);
  for (int64_t i = n - 1; i >= 0; --i) {
    uint32_t j = index(s[i]);
    uint32_t freq = model.freq[j];
    uint32_t x_max = ((kRansL >> sb) << 8) * freq;
    while (x >= x_max) {
      *--ptr = static_cast<uint8_t>(x & 0xff);
      x >>= 8;
    }
    x = ((x / freq) << sb) + (x % freq) + model.start[j];
  }
  ptr -= 4;
  for (int b = 0; b < 4; ++b) ptr[b] = static_cast<uint8_t>(x >> (8 * b));
  out.insert(out.end(), ptr, stream.data() + stream.size());
  return out;
}

inline std::vector<uint8_t> rans_encode_stream(const int32_t* s, int64_t n, int64_t* header_bytes) {
  std::vector<int32_t> alphabet;
  std::vector<int64_t> counts;
  count_symbols(s, n, alphabet, counts);
  return rans_encode_counted(s, n, std::move(alphabet), counts, header_bytes);
}

// ---- decoder -------------------------------------------------------------------------------------

inline RansStatus read_model(ByteReader& r, int64_t count, RansModel& model) {
  model.scale_bits = r.byte();
  uint64_t m = r.varint();
  if (!r.ok) return RansStatus::kTruncated;
  if (model.scale_bits < 1 || model.scale_bits > kRansMaxScaleBits) return RansStatus::kBadHeader;
  if (m == 0) return count == 0 ? RansStatus::kOk : RansStatus::kBadHeader;
  const uint64_t total = uint64_t{1} << model.scale_bits;
  // each symbol costs ≥ 2 header bytes: bounds the allocation by the input size
  if (m > total || m > uint64_t(count) || int64_t(m) > r.left()) return RansStatus::kBadHeader;
  model.alphabet.resize(m);
  int64_t v = unzigzag64(r.varint());
  if (v < INT32_MIN || v > INT32_MAX) return RansStatus::kBadHeader;
  model.alphabet[0] = static_cast<int32_t>(v);
  for (uint64_t i = 1; i < m; ++i) {
    uint64_t gap = r.varint();
    if (gap >= uint64_t(INT32_MAX) - v) return RansStatus::kBadHeader;  // v + gap + 1 > INT32_MAX
    v += int64_t(gap) + 1;
    model.alphabet[i] = static_cast<int32_t>(v);
  }
  model.freq.resize(m);
  uint64_t sum = 0;
  for (uint64_t i = 0; i < m; ++i) {
    uint64_t f = r.varint() + 1;
    if (f == 0 || f > total) return RansStatus::kBadHeader;
    model.freq[i] = static_cast<uint32_t>(f);
    sum += f;
  }
  if (!r.ok) return RansStatus::kTruncated;
  if (sum != total) return RansStatus::kBadHeader;
  fill_starts(model);
  return RansStatus::kOk;
}

// Whether `stream_bytes` bytes after the state can hold `count` symbols of `model` (mode 0).  Every valid stream
// passes: the decoder's state y stays in [L, 2^31); a step with frequency f gives x' + 1 ≤ f·(⌊y/2^S⌋ + 1)
// ≤ y·ρ_f, ρ_f = (f/2^S)·(1 + 2^(S−23)) (as y ≥ 2^23), and k bytes read after it give y' < (x' + 1)·256^k.
// Over the stream, L = y_count < y_0·ρ^count·256^B < 2^31·ρ^count·2^(8B) with ρ = ρ of the largest frequency,
// i.e. count·λ < 8·(B + 1) with λ = −log2 ρ = S − log2(max freq) − log2(1 + 2^(S−23)) bits per symbol.  A
// table with one dominant symbol has λ ≤ 0, so a second bound counts steps instead: a step lowers the state by
// y − x' = ⌊y/2^S⌋·(2^S − f) + start ≥ d = 2^(23−S)·(2^S − max freq) ≥ 1 when there are ≥ 2 symbols, so at most
// R = ⌊(2^31 − 1 − L)/d⌋ steps in a row read no byte, and count ≤ (B + 1)·(R + 1).  Only a one-symbol table has
// no bound (its stream needs no bytes at all, whatever the count).
inline bool rans_count_fits(const RansModel& model, int64_t count, int64_t stream_bytes) {
  if (model.freq.empty()) return count == 0;
  const int s = model.scale_bits;
  const uint32_t fmax = *std::max_element(model.freq.begin(), model.freq.end());
  if (fmax == (uint32_t{1} << s)) return true;
  // margins far above log2's and the products' rounding errors, so that the tests err towards accepting
  const double lambda = s - std::log2(double(fmax)) - std::log2(1.0 + std::ldexp(1.0, s - 23)) - 1e-9;
  const bool by_bits = lambda <= 0 || double(count) * lambda < 8.0 * (double(stream_bytes) + 1.0) * (1.0 + 1e-12) + 1.0;
  const uint64_t d = (uint64_t{1} << (23 - s)) * ((uint64_t{1} << s) - fmax);
  const double runs = double(((uint64_t{1} << 31) - 1 - kRansL) / d + 1);
  return by_bits && double(count) <= (double(stream_bytes) + 1.0) * runs * (1.0 + 1e-12);
}

// Decodes a rans_encode_stream buffer of exactly `count` symbols, in pieces.  open() reads and checks the whole
// header (mode, count, table, state) and the stream's length (mode 1: exactly 4·count bytes; mode 0: what
// rans_count_fits asks) allocating no more than the buffer's size, so a caller can refuse a buffer before it
// allocates `count` symbols.  decode() gives the next symbols; finish() checks that every byte was read and the
// state is L, so a truncated, padded or miscounted buffer is always an error.
class RansDecoder {
 public:
  RansStatus open(const uint8_t* buf, int64_t size, int64_t count) {
    ByteReader r{buf, buf + size};
    mode_ = r.byte();
    stored_count_ = r.varint();
    if (!r.ok) return RansStatus::kTruncated;
    if (mode_ > 1) return RansStatus::kBadHeader;
    if (stored_count_ != uint64_t(count)) return RansStatus::kCountMismatch;
    if (mode_ == 1) {
      if (r.left() / 4 < count) return RansStatus::kTruncated;  // 4·count may overflow; left/4 cannot
      if (r.left() != 4 * count) return RansStatus::kBadStream;
    } else {
      RansStatus st = read_model(r, count, model_);
      if (st != RansStatus::kOk) return st;
      if (r.left() < 4) return RansStatus::kTruncated;
      for (int b = 0; b < 4; ++b) x_ |= uint32_t(r.p[b]) << (8 * b);
      r.p += 4;
      // x < 2^31 keeps freq·(x >> sb) + slot below 2^31 at every step: no overflow on corrupt input.
      if (x_ < kRansL || x_ >= (kRansL << 8)) return RansStatus::kBadStream;
      if (!rans_count_fits(model_, count, r.left())) return RansStatus::kTooShort;
    }
    p_ = r.p;
    end_ = r.end;
    return RansStatus::kOk;
  }

  // The count the header states (for messages).
  uint64_t stored_count() const { return stored_count_; }

  // The next n symbols into out; the calls together ask for the `count` given to open(), which succeeded.
  RansStatus decode(int64_t n, int32_t* out) {
    if (mode_ == 1) {
      if ((end_ - p_) / 4 < n) return RansStatus::kTruncated;
      for (int64_t i = 0; i < n; ++i) {
        uint32_t u = 0;
        for (int b = 0; b < 4; ++b) u |= uint32_t(p_[4 * i + b]) << (8 * b);
        out[i] = static_cast<int32_t>(u);
      }
      p_ += 4 * n;
      return RansStatus::kOk;
    }
    if (n > 0 && slot_symbol_.empty()) {
      slot_symbol_.resize(size_t{1} << model_.scale_bits);
      for (size_t j = 0; j < model_.freq.size(); ++j)
        std::fill_n(slot_symbol_.begin() + model_.start[j], model_.freq[j], static_cast<uint32_t>(j));
    }
    // locals, not members, in the loop: the stores to out could alias them and force reloads
    const int sb = model_.scale_bits;
    const uint32_t mask = (uint32_t{1} << sb) - 1;
    const uint32_t* slot_symbol = slot_symbol_.data();
    const int32_t* alphabet = model_.alphabet.data();
    const uint32_t* freq = model_.freq.data();
    const uint32_t* start = model_.start.data();
    const uint8_t* p = p_;
    const uint8_t* const end = end_;
    uint32_t x = x_;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t slot = x & mask;
      uint32_t j = slot_symbol[slot];
      out[i] = alphabet[j];
      x = freq[j] * (x >> sb) + slot - start[j];
      while (x < kRansL) {
        if (p >= end) return RansStatus::kTruncated;
        x = (x << 8) | *p++;
      }
    }
    p_ = p;
    x_ = x;
    return RansStatus::kOk;
  }

  // kOk when the symbols decoded so far used every byte and left the state at L.
  RansStatus finish() const {
    if (p_ != end_) return RansStatus::kBadStream;  // bytes left over: not a buffer rans_encode wrote
    if (mode_ == 0 && x_ != kRansL) return RansStatus::kBadStream;
    return RansStatus::kOk;
  }

 private:
  uint8_t mode_ = 0;
  uint64_t stored_count_ = 0;
  RansModel model_;
  std::vector<uint32_t> slot_symbol_;  // slot → alphabet index, built by the first decode()
  const uint8_t* p_ = nullptr;
  const uint8_t* end_ = nullptr;
  uint32_t x_ = 0;
};

}  // namespace slimrate

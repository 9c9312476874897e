// Torch-free exp-Golomb coder (docs/slim-format.md §6): order-k codes, MSB-first bit order, the
// last byte zero-padded; a decoder refuses any bit after the last code but that padding.  The code of
// u ≥ 0 is w = u + 2^k written in nbits = ⌊log2 w⌋+1 bits,
// preceded by nbits−1−k zeros (the same bits as EG0 of ⌊u/2^k⌋ followed by the k low bits of u),
// so len(u) = 2·nbits − 1 − k.  Signed symbols are zig-zag mapped first: u = 2s (s ≥ 0),
// u = −2s − 1 (s < 0); INT32_MIN (u = 2^32 − 1) is not coded.  Words are 64-bit, so
// u + 2^k ≤ 2^32 − 2 + 2^31 cannot overflow.
#pragma once
#include <cstdint>

namespace slimrate {

// k ≤ 31 keeps every code ≤ 64 bits and the decoder's reads ≤ 33 bits (eg_decode).
constexpr int kEgMaxOrder = 31;
// Largest u of a signed symbol: 2·(2^31 − 1); of an unsigned one: 2^31 − 1.
constexpr uint64_t kEgMaxSigned = 0xFFFFFFFEull;
constexpr uint64_t kEgMaxUnsigned = 0x7FFFFFFFull;

inline uint64_t eg_max_u(bool is_signed) { return is_signed ? kEgMaxSigned : kEgMaxUnsigned; }

// The zig-zag index of s, or a value > eg_max_u(is_signed) for symbols that cannot be coded.
inline uint64_t eg_index(int32_t s, bool is_signed) {
  int64_t v = s;
  if (!is_signed) return v < 0 ? ~uint64_t{0} : static_cast<uint64_t>(v);
  return v >= 0 ? static_cast<uint64_t>(2 * v) : static_cast<uint64_t>(-2 * v - 1);
}

inline int bit_width(uint64_t w) { return 64 - __builtin_clzll(w); }  // w > 0

inline int64_t eg_length(uint64_t u, int k) { return 2 * bit_width(u + (uint64_t{1} << k)) - 1 - k; }

// Σ len over symbols[0, n); -1 with *bad = index of the first symbol that cannot be coded.
// The sum loop has no early exit so it vectorises; the bad index is searched only on failure.
inline int64_t eg_span_bits(const int32_t* symbols, int64_t n, int k, bool is_signed, int64_t* bad) {
  const uint64_t max_u = eg_max_u(is_signed);
  int64_t bits = 0;
  bool invalid = false;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t u = eg_index(symbols[i], is_signed);
    invalid |= u > max_u;
    bits += eg_length(u & 0xFFFFFFFFull, k);
  }
  if (!invalid) return bits;
  int64_t i = 0;
  while (eg_index(symbols[i], is_signed) <= max_u) ++i;
  *bad = i;
  return -1;
}

// MSB-first writer into a byte buffer: pending bits sit right-aligned in a 64-bit accumulator and
// leave it as big-endian 32-bit words.
class BitWriter {
 public:
  // `phase` leading zero bits (0..7) let a chunk start mid-byte; the caller ORs that byte in.
  BitWriter(uint8_t* out, int phase) : out_(out), fill_(phase) {}

  // Appends the n low bits of v, 1 ≤ n ≤ 64.
  void put(uint64_t v, int n) {
    if (n > 32) {
      put32(v >> 32, n - 32);
      put32(v & 0xFFFFFFFFull, 32);
    } else {
      put32(v, n);
    }
  }

  // Writes the remaining bits, zero-padding the last byte; returns the bytes written.
  int64_t finish() {
    for (; fill_ >= 8; fill_ -= 8) *out_++ = static_cast<uint8_t>(acc_ >> (fill_ - 8));
    if (fill_ > 0) *out_++ = static_cast<uint8_t>(acc_ << (8 - fill_));
    fill_ = 0;
    return out_ - start_;
  }

 private:
  // fill_ < 32 on entry, so fill_ + n < 64: no bit falls off the accumulator.
  void put32(uint64_t v, int n) {
    acc_ = (acc_ << n) | v;
    fill_ += n;
    if (fill_ >= 32) {
      fill_ -= 32;
      uint32_t word = static_cast<uint32_t>(acc_ >> fill_);
      out_[0] = static_cast<uint8_t>(word >> 24);
      out_[1] = static_cast<uint8_t>(word >> 16);
      out_[2] = static_cast<uint8_t>(word >> 8);
      out_[3] = static_cast<uint8_t>(word);
      out_ += 4;
    }
  }
  uint8_t* out_;
  uint8_t* const start_ = out_;
  uint64_t acc_ = 0;
  int fill_;
};

// Encodes symbols[0, n) (all codable: eg_span_bits checked them) starting `phase` bits into out[0].
// The code of u is w = u + 2^k written in len(u) bits: its leading zeros are the prefix.
inline int64_t eg_encode_span(const int32_t* symbols, int64_t n, int k, bool is_signed, int phase, uint8_t* out) {
  BitWriter w(out, phase);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t u = eg_index(symbols[i], is_signed);
    w.put(u + (uint64_t{1} << k), static_cast<int>(eg_length(u, k)));
  }
  return w.finish();
}

enum class EgStatus { kOk, kTruncated, kLongPrefix, kOutOfRange, kTrailing };

// What a decoder error means, for messages.
inline const char* eg_status_reason(EgStatus st, bool is_signed) {
  switch (st) {
    case EgStatus::kTruncated: return "ran out of bits (truncated input or wrong count)";
    case EgStatus::kTrailing:
      return "trailing bytes or non-zero padding bits after the last code (a padded stream or a count below the "
             "stream's)";
    case EgStatus::kLongPrefix: return "corrupt exp-Golomb stream (a prefix of more than 32 zeros)";
    case EgStatus::kOutOfRange:
      return is_signed ? "corrupt exp-Golomb stream (the decoded value is not an int32 symbol eg_encode writes "
                         "with signed=True)"
                       : "corrupt exp-Golomb stream (the decoded value is not an int32 symbol eg_encode writes "
                         "with signed=False)";
    default: return "ok";
  }
}

// MSB-first reader that never reads past buf[size).
class BitReader {
 public:
  BitReader(const uint8_t* buf, int64_t size) : p_(buf), end_(buf + size) {}

  // Loads bytes until ≥ 57 bits are pending or the input ends.
  void refill() {
    while (avail_ <= 56 && p_ < end_) {
      bits_ |= static_cast<uint64_t>(*p_++) << (56 - avail_);
      avail_ += 8;
    }
  }
  int avail() const { return avail_; }
  // True when every bit not taken yet is a zero bit of the last byte: no byte follows and the padding is zeros.
  bool at_padding() const { return p_ == end_ && avail_ < 8 && bits_ == 0; }
  // Leading zeros among the pending bits (64 when all pending bits are zero).
  int leading_zeros() const { return bits_ == 0 ? 64 : __builtin_clzll(bits_); }
  // Takes n ≤ 57 bits; the caller checked n ≤ avail().
  uint64_t take(int n) {
    if (n == 0) return 0;
    uint64_t v = bits_ >> (64 - n);
    bits_ = n == 64 ? 0 : bits_ << n;
    avail_ -= n;
    return v;
  }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
  uint64_t bits_ = 0;  // pending bits, left-aligned
  int avail_ = 0;
};

// A code longer than the pending bits: its zeros, the zeros+1 high bits of w, then k low bits,
// each read after a refill.  Returns w, or 0 when the input ends first (w ≥ 2^k > 0 otherwise).
inline uint64_t read_long_code(BitReader& r, int zeros, int k) {
  r.take(zeros);
  int high_bits = zeros + 1;  // ≤ 33
  r.refill();
  if (high_bits > r.avail()) return 0;
  uint64_t word = r.take(high_bits);
  if (k > 0) {
    r.refill();
    if (k > r.avail()) return 0;
    word = (word << k) | r.take(k);
  }
  return word;
}

// Decodes an eg_encode stream in pieces: decode() gives the next symbols, finish() checks that the stream ends
// right after them (no byte follows the last code, the padding bits are zeros), so a decoder that reads the
// stream to its end reads exactly the count the encoder wrote.
class EgDecoder {
 public:
  EgDecoder(const uint8_t* buf, int64_t size, int k, bool is_signed) : r_(buf, size), k_(k), is_signed_(is_signed) {}

  // The next n symbols into out; on failure returns the status and *where = the failing symbol's index in [0, n).
  EgStatus decode(int64_t n, int32_t* out, int64_t* where) {
    const uint64_t max_u = eg_max_u(is_signed_);
    const int k = k_;
    const bool is_signed = is_signed_;
    BitReader r = r_;  // a local copy stays in registers: the stores to out could alias a member
    for (int64_t i = 0; i < n; ++i) {
      // *where only on failure: a store per symbol is not free (the byte loads may alias it)
      auto fail = [&](EgStatus st) {
        *where = i;
        return st;
      };
      r.refill();
      int zeros = r.leading_zeros();
      // A valid code has at most 32 leading zeros (nbits ≤ 33); after refill() ≥ 57 bits are pending
      // unless the input ended, so more zeros than pending bits means the input ran out.
      if (zeros >= r.avail()) return fail(r.avail() > 32 ? EgStatus::kLongPrefix : EgStatus::kTruncated);
      if (zeros > 32) return fail(EgStatus::kLongPrefix);
      uint64_t word;
      int len = 2 * zeros + 1 + k;
      if (len <= r.avail()) {  // the usual case: the whole code is pending
        word = r.take(len);
      } else {
        word = read_long_code(r, zeros, k);
        if (word == 0) return fail(EgStatus::kTruncated);
      }
      uint64_t u = word - (uint64_t{1} << k);
      if (u > max_u) return fail(EgStatus::kOutOfRange);
      out[i] = is_signed ? static_cast<int32_t>((u & 1) ? -static_cast<int64_t>(u >> 1) - 1
                                                        : static_cast<int64_t>(u >> 1))
                         : static_cast<int32_t>(u);
    }
    r_ = r;
    return EgStatus::kOk;
  }

  // kOk when the codes decoded so far end the stream.
  EgStatus finish() const { return r_.at_padding() ? EgStatus::kOk : EgStatus::kTrailing; }

 private:
  BitReader r_;
  int k_;
  bool is_signed_;
};

// Decodes exactly the `count` symbols that fill buf (EgDecoder, then its finish()) into out; on failure returns
// the status and *where = the failing symbol's index (count when bits follow the last code).
inline EgStatus eg_decode_stream(const uint8_t* buf, int64_t size, int64_t count, int k, bool is_signed,
                                 int32_t* out, int64_t* where) {
  EgDecoder d(buf, size, k, is_signed);
  EgStatus st = d.decode(count, out, where);
  if (st != EgStatus::kOk) return st;
  *where = count;
  return d.finish();
}

}  // namespace slimrate

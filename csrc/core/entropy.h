// The entropy coders of the eg_* and rans_* ops (docs/slim-format.md §6-§7; the coders themselves are
// csrc/kernels/entropy_eg.h and entropy_rans.h) on raw pointers. Callers check the arguments (the faces do:
// 0 ≤ k ≤ kEgMaxOrder, count ≥ 0, output sizes); what depends on the data is returned: Status::bad_value for a
// symbol without a code, Status::corrupt_stream for a stream that is not what the encoder writes, each with
// `error` saying which and where, in the words the faces raise (core/error_text.h). These functions never throw.
//
// Exp-Golomb encoding runs in parallel over chunks of kEgChunk symbols: a first pass (eg_plan) sums each chunk's
// code lengths, so every chunk knows its bit offset and the bytes are the same for any thread count. Decoding a
// stream, and rANS encoding and decoding, are sequential (no chunk offsets are stored).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace slimrate::core {

// 64 Ki symbols per task, as kRateChunk: ≥ 8 KiB of output each, few enough tasks to schedule.
constexpr int64_t kEgChunk = int64_t{1} << 16;

// Where the code of each kEgChunk-symbol chunk starts: offset[c] bits into the stream; offset.back() = its length.
struct EgPlan {
  std::vector<int64_t> offset;
  int64_t bits() const { return offset.back(); }
  int64_t bytes() const { return (bits() + 7) / 8; }
};

// The plan of the order-k code of symbols[0, n) (zig-zag mapped when is_signed); bad_value when a symbol has
// none (`error` names the first).
Status eg_plan(const int32_t* symbols, int64_t n, int k, bool is_signed, EgPlan* plan, std::string* error) noexcept;

// out[0, plan.bytes()) = that code, MSB first, the last byte zero-padded; plan from eg_plan of the same symbols.
Status eg_encode(const int32_t* symbols, int64_t n, int k, bool is_signed, const EgPlan& plan, uint8_t* out) noexcept;

// out[0, count) = the count symbols whose order-k codes fill buf[0, size) exactly (no byte after the last code,
// zero padding bits); corrupt_stream otherwise. Callers check count ≤ 8·size (a code is at least one bit).
Status eg_decode(const uint8_t* buf, int64_t size, int64_t count, int k, bool is_signed, int32_t* out,
                 std::string* error) noexcept;

// *out = the rANS buffer of symbols[0, n): its header (count, alphabet, frequencies) and stream.
Status rans_encode(const int32_t* symbols, int64_t n, std::vector<uint8_t>* out) noexcept;

// ok when buf[0, size) is a rANS buffer of count symbols as far as can be told before decoding it: its whole
// header, and its stream's length against count; corrupt_stream otherwise. Allocates no more than the buffer's
// size, so a caller checks a buffer before it allocates count symbols.
Status rans_check(const uint8_t* buf, int64_t size, int64_t count, std::string* error) noexcept;

// out[0, count) = the symbols of the rANS buffer buf[0, size), which must hold exactly count symbols and end
// with them; corrupt_stream otherwise (truncated, padded or miscounted buffers always are).
Status rans_decode(const uint8_t* buf, int64_t size, int64_t count, int32_t* out, std::string* error) noexcept;

}  // namespace slimrate::core

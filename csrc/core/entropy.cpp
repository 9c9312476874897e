// Bodies of the coders of core/entropy.h around csrc/kernels/entropy_eg.h and entropy_rans.h.
#include "core/entropy.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "core/arch.h"
#include "core/error_text.h"
#include "core/parallel.h"
#include "kernels/entropy_eg.h"
#include "kernels/entropy_rans.h"

namespace slimrate::core {
namespace {

const char* uncodable_reason(bool is_signed) {
  return is_signed ? "INT32_MIN has no signed exp-Golomb code (its zig-zag index 2^32 - 1 is reserved)"
                   : "signed=False codes only symbols >= 0; pass signed=True";
}

// The length pass vectorises (clz → vplzcntq) only with AVX-512: one build carries both clones.
SLIMRATE_CPU_CLONES_V4
int64_t span_bits(const int32_t* s, int64_t n, int k, bool is_signed, int64_t* bad) {
  return eg_span_bits(s, n, k, is_signed, bad);
}

int64_t chunk_count(int64_t n) { return (n + kEgChunk - 1) / kEgChunk; }

// What is wrong with buf[0, size) that RansDecoder refused with st, for `count` symbols.
std::string rans_error(RansStatus st, const RansDecoder& decoder, int64_t size, int64_t count) {
  if (st == RansStatus::kCountMismatch)
    return error_text("count: the buffer holds ", decoder.stored_count(), " symbols, got count=", count);
  return error_text("buf: ", rans_status_reason(st), " (", size, " bytes, count ", count, ")");
}

// RansDecoder::decode out of line: inlined into rans_decode, GCC 12 spills one of the loop's table pointers and
// reloads it per symbol (measured: a 4 Mi-symbol decode 2-3% slower).
__attribute__((noinline)) RansStatus decode_symbols(RansDecoder& decoder, int64_t count, int32_t* out) {
  return decoder.decode(count, out);
}

}  // namespace

Status eg_plan(const int32_t* symbols, int64_t n, int k, bool is_signed, EgPlan* plan, std::string* error) noexcept {
  try {
    const int64_t chunks = chunk_count(n);
    std::vector<int64_t> bits(chunks), bad(chunks, -1);
    parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t begin = c * kEgChunk, len = std::min(kEgChunk, n - begin);
        int64_t where = -1;
        bits[c] = span_bits(symbols + begin, len, k, is_signed, &where);
        if (bits[c] < 0) bad[c] = begin + where;
      }
    });
    for (int64_t b : bad)
      if (b >= 0) {
        *error = error_text("symbols[", b, "] = ", symbols[b], ": ", uncodable_reason(is_signed));
        return Status::bad_value;
      }
    plan->offset.assign(chunks + 1, 0);
    for (int64_t c = 0; c < chunks; ++c) plan->offset[c + 1] = plan->offset[c] + bits[c];
    return Status::ok;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status eg_encode(const int32_t* symbols, int64_t n, int k, bool is_signed, const EgPlan& plan, uint8_t* out) noexcept {
  const std::vector<int64_t>& offset = plan.offset;
  const int64_t chunks = chunk_count(n);
  try {
    // A chunk starting mid-byte shares that byte with the previous chunk: it writes the rest of its bytes in
    // parallel and its first byte is ORed in afterwards, in chunk order.
    std::vector<uint8_t> first_byte(chunks, 0);
    Status status = try_parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<uint8_t> local;
      for (int64_t c = lo; c < hi; ++c) {
        const int phase = static_cast<int>(offset[c] % 8);
        const int64_t begin = c * kEgChunk, len = std::min(kEgChunk, n - begin);
        local.assign((phase + offset[c + 1] - offset[c] + 7) / 8, 0);
        const int64_t written = eg_encode_span(symbols + begin, len, k, is_signed, phase, local.data());
        const int64_t skip = phase ? 1 : 0;
        if (phase && written > 0) first_byte[c] = local[0];
        if (written > skip) std::memcpy(out + offset[c] / 8 + skip, local.data() + skip, written - skip);
      }
    });
    for (int64_t c = 0; c < chunks; ++c)
      if (offset[c] % 8) out[offset[c] / 8] |= first_byte[c];
    return status;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status eg_decode(const uint8_t* buf, int64_t size, int64_t count, int k, bool is_signed, int32_t* out,
                 std::string* error) noexcept {
  try {
    int64_t where = 0;
    const EgStatus st = eg_decode_stream(buf, size, count, k, is_signed, out, &where);
    if (st == EgStatus::kOk) return Status::ok;
    *error = st == EgStatus::kTrailing
                 ? error_text("buf: ", eg_status_reason(st, is_signed), "; ", count, " codes read from ", size,
                              " bytes")
                 : error_text("buf: ", eg_status_reason(st, is_signed), " at symbol ", where, " of ", count);
    return Status::corrupt_stream;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status rans_encode(const int32_t* symbols, int64_t n, std::vector<uint8_t>* out) noexcept {
  try {
    int64_t header_bytes = 0;
    *out = rans_encode_stream(symbols, n, &header_bytes);
    return Status::ok;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status rans_check(const uint8_t* buf, int64_t size, int64_t count, std::string* error) noexcept {
  try {
    RansDecoder decoder;
    const RansStatus st = decoder.open(buf, size, count);
    if (st == RansStatus::kOk) return Status::ok;
    *error = rans_error(st, decoder, size, count);
    return Status::corrupt_stream;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status rans_decode(const uint8_t* buf, int64_t size, int64_t count, int32_t* out, std::string* error) noexcept {
  try {
    RansDecoder decoder;
    RansStatus st = decoder.open(buf, size, count);
    if (st == RansStatus::kOk) st = decode_symbols(decoder, count, out);
    if (st == RansStatus::kOk) st = decoder.finish();
    if (st == RansStatus::kOk) return Status::ok;
    *error = rans_error(st, decoder, size, count);
    return Status::corrupt_stream;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

}  // namespace slimrate::core

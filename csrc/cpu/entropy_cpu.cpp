// CPU glue of the entropy coders (schemas in csrc/ops.cpp; coders in csrc/kernels/entropy_*.h).
// Exp-Golomb encoding runs in parallel over fixed chunks: a first pass sums each chunk's code
// lengths, so every chunk knows its exact bit offset and the output is the same bytes for any thread
// count.  Decoding one EG or rANS stream, and rANS encoding, are sequential (no chunk offsets are
// stored).  Data-dependent errors use TORCH_CHECK_VALUE, which Python sees as ValueError.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "core/arch.h"
#include "coding_inputs.h"
#include "kernels/entropy_eg.h"
#include "kernels/entropy_rans.h"

namespace slimrate {
namespace {

// 64 Ki symbols per task, as in rate_cpu.cpp: ≥ 8 KiB of output each, few enough tasks to schedule.
constexpr int64_t kChunk = int64_t{1} << 16;
// The most int32 symbols whose byte size an int64 holds (at::empty fails beyond it): a header of one repeated
// symbol may state any count in a few bytes.
constexpr int64_t kMaxInt32Symbols = INT64_MAX / 4;

void check_order(int64_t k) {
  TORCH_CHECK_VALUE(k >= 0 && k <= kEgMaxOrder, "k: expected an order in [0, ", kEgMaxOrder, "], got ", k);
}

const char* uncodable_reason(bool is_signed) {
  return is_signed ? "INT32_MIN has no signed exp-Golomb code (its zig-zag index 2^32 - 1 is reserved)"
                   : "signed=False codes only symbols >= 0; pass signed=True";
}

// The length pass vectorises (clz → vplzcntq) only with AVX-512: one build carries both clones.
SLIMRATE_CPU_CLONES_V4
int64_t span_bits(const int32_t* s, int64_t n, int k, bool is_signed, int64_t* bad) {
  return eg_span_bits(s, n, k, is_signed, bad);
}

// Bits of each kChunk-symbol chunk; raises naming the first symbol that cannot be coded.
std::vector<int64_t> chunk_bits(const at::Tensor& symbols, int k, bool is_signed) {
  const int32_t* s = symbols.const_data_ptr<int32_t>();
  int64_t n = symbols.numel();
  int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> bits(chunks), bad(chunks, -1);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      int64_t begin = c * kChunk, len = std::min(kChunk, n - begin), where = -1;
      bits[c] = span_bits(s + begin, len, k, is_signed, &where);
      if (bits[c] < 0) bad[c] = begin + where;
    }
  });
  for (int64_t b : bad)
    TORCH_CHECK_VALUE(b < 0, "symbols[", b, "] = ", s[b], ": ", uncodable_reason(is_signed));
  return bits;
}

at::Tensor eg_code_length_cpu(const at::Tensor& symbols_in, int64_t k, bool is_signed) {
  at::Tensor symbols = checked_1d(symbols_in, "symbols", at::kInt);
  check_order(k);
  int64_t total = 0;
  for (int64_t b : chunk_bits(symbols, static_cast<int>(k), is_signed)) total += b;
  return at::scalar_tensor(total, at::dtype(at::kLong));
}

at::Tensor eg_encode_cpu(const at::Tensor& symbols_in, int64_t k, bool is_signed) {
  at::Tensor symbols = checked_1d(symbols_in, "symbols", at::kInt);
  check_order(k);
  std::vector<int64_t> bits = chunk_bits(symbols, static_cast<int>(k), is_signed);
  int64_t chunks = static_cast<int64_t>(bits.size());
  std::vector<int64_t> offset(chunks + 1, 0);  // bit offset of each chunk
  for (int64_t c = 0; c < chunks; ++c) offset[c + 1] = offset[c] + bits[c];
  at::Tensor out = at::empty({(offset[chunks] + 7) / 8}, at::dtype(at::kByte));
  uint8_t* o = out.mutable_data_ptr<uint8_t>();
  const int32_t* s = symbols.const_data_ptr<int32_t>();
  int64_t n = symbols.numel();
  // A chunk starting mid-byte shares that byte with the previous chunk: it writes the rest of its
  // bytes in parallel and its first byte is ORed in afterwards, in chunk order.
  std::vector<uint8_t> first_byte(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> local;
    for (int64_t c = lo; c < hi; ++c) {
      int phase = static_cast<int>(offset[c] % 8);
      int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
      local.assign((phase + bits[c] + 7) / 8, 0);
      int64_t written = eg_encode_span(s + begin, len, static_cast<int>(k), is_signed, phase, local.data());
      int64_t skip = phase ? 1 : 0;
      if (phase && written > 0) first_byte[c] = local[0];
      if (written > skip) std::memcpy(o + offset[c] / 8 + skip, local.data() + skip, written - skip);
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    if (offset[c] % 8) o[offset[c] / 8] |= first_byte[c];
  return out;
}

at::Tensor eg_decode_cpu(const at::Tensor& buf_in, int64_t count, int64_t k, bool is_signed) {
  at::Tensor buf = checked_1d(buf_in, "buf", at::kByte);
  check_order(k);
  TORCH_CHECK_VALUE(count >= 0, "count: expected >= 0, got ", count);
  // Every code is at least one bit: checked before the output is allocated.
  TORCH_CHECK_VALUE(count <= 8 * buf.numel(), "buf: ", buf.numel(), " bytes cannot hold ", count,
                    " exp-Golomb codes (truncated input or wrong count)");
  at::Tensor out = at::empty({count}, at::dtype(at::kInt));
  int64_t where = 0;
  EgStatus st = eg_decode_stream(buf.const_data_ptr<uint8_t>(), buf.numel(), count, static_cast<int>(k),
                                 is_signed, out.mutable_data_ptr<int32_t>(), &where);
  TORCH_CHECK_VALUE(st != EgStatus::kTrailing, "buf: ", eg_status_reason(st, is_signed), "; ", count,
                    " codes read from ", buf.numel(), " bytes");
  TORCH_CHECK_VALUE(st == EgStatus::kOk, "buf: ", eg_status_reason(st, is_signed), " at symbol ", where, " of ", count);
  return out;
}

at::Tensor rans_encode_cpu(const at::Tensor& symbols_in) {
  at::Tensor symbols = checked_1d(symbols_in, "symbols", at::kInt);
  int64_t header_bytes = 0;
  std::vector<uint8_t> bytes = rans_encode_stream(symbols.const_data_ptr<int32_t>(), symbols.numel(), &header_bytes);
  at::Tensor out = at::empty({static_cast<int64_t>(bytes.size())}, at::dtype(at::kByte));
  std::memcpy(out.mutable_data_ptr<uint8_t>(), bytes.data(), bytes.size());
  return out;
}

at::Tensor rans_decode_cpu(const at::Tensor& buf_in, int64_t count) {
  at::Tensor buf = checked_1d(buf_in, "buf", at::kByte);
  TORCH_CHECK_VALUE(count >= 0, "count: expected >= 0, got ", count);
  // The whole header and the stream's length are checked before `count` symbols are allocated.
  RansDecoder decoder;
  RansStatus st = decoder.open(buf.const_data_ptr<uint8_t>(), buf.numel(), count);
  TORCH_CHECK_VALUE(st != RansStatus::kCountMismatch, "count: the buffer holds ", decoder.stored_count(),
                    " symbols, got count=", count);
  TORCH_CHECK_VALUE(st == RansStatus::kOk, "buf: ", rans_status_reason(st), " (", buf.numel(), " bytes, count ",
                    count, ")");
  TORCH_CHECK_VALUE(count <= kMaxInt32Symbols, "count: ", count, " int32 symbols exceed the largest tensor (",
                    kMaxInt32Symbols, ")");
  at::Tensor out = at::empty({count}, at::dtype(at::kInt));
  int32_t* o = out.mutable_data_ptr<int32_t>();
  st = decoder.decode(count, o);
  if (st == RansStatus::kOk) st = decoder.finish();
  TORCH_CHECK_VALUE(st == RansStatus::kOk, "buf: ", rans_status_reason(st), " (", buf.numel(), " bytes, count ",
                    count, ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("eg_code_length", &eg_code_length_cpu);
  m.impl("eg_encode", &eg_encode_cpu);
  m.impl("eg_decode", &eg_decode_cpu);
  m.impl("rans_encode", &rans_encode_cpu);
  m.impl("rans_decode", &rans_decode_cpu);
}

}  // namespace slimrate

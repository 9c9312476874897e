// Bodies of the chunked tensor codec of core/slim_codec.h: the fused quantize pass and the "eg" table of
// kernels/slim_codec.h, the coders of kernels/entropy_eg.h and entropy_rans.h, loops cloned per x86 ISA
// (core/arch.h).
#include "core/slim_codec.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>

#include "core/arch.h"
#include "core/error_text.h"
#include "core/parallel.h"
#include "kernels/entropy_eg.h"
#include "kernels/entropy_rans.h"

namespace slimrate::core {
namespace {

// AVX2 and AVX-512 round with vroundpd and vectorise the passes below (SLIMRATE_CPU_CLONES: core/arch.h);
// baseline x86-64 calls nearbyint.
template <class Fmt>
SLIMRATE_CPU_CLONES int64_t quantize_span(const typename Fmt::storage* x, int64_t n, double step, int32_t* q,
                                          SymbolCounter* counter) {
  return quantize_chunk<Fmt>(x, n, step, q, counter);
}

// Symbols → their ranks in the "eg" table, in place.
SLIMRATE_CPU_CLONES void symbols_to_ranks(int32_t* q, int64_t n, const SymbolIndex& index, const uint32_t* rank_of) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int32_t>(rank_of[index(q[i])]);
}

// Ranks → symbols in place; returns the index of the first rank ≥ m (nothing mapped then), or -1.
// __restrict: without it GCC 12 does not vectorise the gather.
SLIMRATE_CPU_CLONES int64_t ranks_to_symbols(int32_t* __restrict q, int64_t n, const int32_t* __restrict table,
                                             int64_t m) {
  int32_t top = 0;  // decoded ranks are ≥ 0
  for (int64_t i = 0; i < n; ++i) top = std::max(top, q[i]);
  if (top >= m) {
    int64_t i = 0;
    while (q[i] < m) ++i;
    return i;
  }
  for (int64_t i = 0; i < n; ++i) q[i] = table[q[i]];
  return -1;
}

// Signed EG0 of q[0, n), zero-padded to a byte, sized from the symbols' counts (quantized symbols are never
// INT32_MIN, so all have a code).
std::vector<uint8_t> eg_signed_bytes(const int32_t* q, int64_t n, const SymbolCounts& counts) {
  int64_t bits = 0;
  for (size_t j = 0; j < counts.alphabet.size(); ++j)
    bits += counts.counts[j] * eg_length(eg_index(counts.alphabet[j], true), 0);
  std::vector<uint8_t> out((bits + 7) / 8);
  eg_encode_span(q, n, 0, true, 0, out.data());
  return out;
}

// out[i] = q[i]·step in float64, rounded once to Fmt (dequantize_one).  kTrackRange: also *lo, *hi = min and max
// of q, so that the caller checks for overflow once per span (range_dequantizes_finite).
template <class Fmt, bool kTrackRange>
SLIMRATE_CPU_CLONES void dequantize_span(const int32_t* q, int64_t n, double step, typename Fmt::storage* out,
                                         int32_t* lo = nullptr, int32_t* hi = nullptr) {
  int32_t mn = INT32_MAX, mx = INT32_MIN;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = dequantize_one<Fmt>(q[i], step);
    if constexpr (kTrackRange) {
      mn = std::min(mn, q[i]);
      mx = std::max(mx, q[i]);
    }
  }
  if constexpr (kTrackRange) {
    *lo = mn;
    *hi = mx;
  }
}

// out[0, n) = q·step (dequantize_span); returns the index of the first q whose q·step overflows Fmt, or -1.  The
// range is tracked only when some int32 q overflows at this step (may_overflow; float16 at the usual steps):
// tracking it costs 3-5% of a decode.
template <class Fmt>
int64_t dequantize_checked(const int32_t* q, int64_t n, double step, bool may_overflow, typename Fmt::storage* out) {
  if (!may_overflow) {
    dequantize_span<Fmt, false>(q, n, step, out);
    return -1;
  }
  int32_t lo, hi;
  dequantize_span<Fmt, true>(q, n, step, out, &lo, &hi);
  if (range_dequantizes_finite<Fmt>(lo, hi, step)) return -1;
  int64_t i = 0;
  while (dequantizes_finite<Fmt>(q[i], step)) ++i;
  return i;
}

// int32 scratch of n symbols, one per thread (not zeroed).
std::unique_ptr<int32_t[]> scratch(int64_t n) { return std::unique_ptr<int32_t[]>(new int32_t[n]); }

// ---- encode ----------------------------------------------------------------------------------------

// Python's {:g} of v, as the reference words its messages.
std::string g_format(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", v);
  return text;
}

// What is wrong with the element x[i] (flat index), which has no symbol or whose q·step overflows the format.
template <class Fmt>
std::string refused_value(const typename Fmt::storage* x, int64_t i, double step, FloatFormat format) {
  const double v = load_f64<Fmt>(x[i]);
  if (!std::isfinite(v))
    return error_text("x: expected finite values, got ", std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf",
                      " at flat index ", i);
  if (!(std::fabs(v / step) < kQuantizeLimit)) {
    char ratio[32];  // Python's {:.4g}, as ops.quantize words it
    std::snprintf(ratio, sizeof ratio, "%.4g", std::fabs(v / step));
    return error_text("x/step: |x|/step = ", ratio, " at flat index ", i, " is not below 2^31 - 1, so it has no ",
                      "int32 symbol; use a larger step (got ", g_format(step), ")");
  }
  const int64_t q = static_cast<int64_t>(std::nearbyint(v / step));
  return error_text("x: ", g_format(v), " at flat index ", i, " quantizes to q = ", q, " and q·step = ",
                    g_format(static_cast<double>(q) * step), " overflows ", format_name(format), " (step ",
                    g_format(step), "); use a smaller step, or coder \"raw\" to store the tensor losslessly");
}

// The fused pass over every chunk; "eg-signed" and "rans" chunks are coded in it, "eg" chunks counted into
// counts. Returns the flat index of the first element refused, or -1.
template <class Fmt>
int64_t quantize_and_code(const typename Fmt::storage* x, double step, SlimCoder coder, const SlimChunks& chunks,
                          std::vector<SymbolCounts>& counts, std::vector<std::vector<uint8_t>>& bytes,
                          Status* status) {
  std::vector<int64_t> bad(chunks.count, -1);
  if (coder == SlimCoder::eg)
    counts.resize(chunks.count);
  else
    bytes.resize(chunks.count);
  *status = try_parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
    auto q = scratch(std::min(chunks.size, chunks.numel));
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t begin = chunks.begin(c), n = chunks.length(c);
      SymbolCounter counter;
      const int64_t where = quantize_span<Fmt>(x + begin, n, step, q.get(), &counter);
      if (where >= 0) {
        bad[c] = begin + where;
        continue;
      }
      SymbolCounts chunk_counts = counter.finish(q.get(), n);
      if (coder == SlimCoder::eg) {
        counts[c] = std::move(chunk_counts);
      } else if (coder == SlimCoder::eg_signed) {
        bytes[c] = eg_signed_bytes(q.get(), n, chunk_counts);
      } else {
        int64_t header_bytes = 0;
        bytes[c] = rans_encode_counted(q.get(), n, std::move(chunk_counts.alphabet), chunk_counts.counts,
                                       &header_bytes);
      }
    }
  });
  for (int64_t i : bad)
    if (i >= 0) return i;
  return -1;
}

// "eg": the table of the whole tensor and each chunk's bytes, from the chunks' counts.
void plan_ranks(const std::vector<SymbolCounts>& counts, SlimEncoding* enc) {
  enc->table = eg_table(merge_counts(counts));
  const EgTable& table = enc->table;
  const int64_t m = static_cast<int64_t>(table.values.size());
  int64_t unused = 0;
  enc->layout = {m, (eg_span_bits(table.values.data(), m, 0, true, &unused) + 7) / 8};
  SymbolIndex index(table.alphabet);
  for (const SymbolCounts& chunk : counts) {
    int64_t bits = 0;
    for (size_t j = 0; j < chunk.alphabet.size(); ++j)
      bits += chunk.counts[j] * eg_length(table.rank_of[index(chunk.alphabet[j])], 0);
    enc->layout.push_back((bits + 7) / 8);
  }
}

template <class Fmt>
Status encode_plan(const typename Fmt::storage* x, FloatFormat format, double step, SlimCoder coder,
                   const SlimChunks& chunks, SlimEncoding* enc, std::string* error) {
  std::vector<SymbolCounts> counts;
  Status status = Status::ok;
  const int64_t bad = quantize_and_code<Fmt>(x, step, coder, chunks, counts, enc->chunk_bytes, &status);
  if (status != Status::ok) return status;
  if (bad >= 0) {
    *error = refused_value<Fmt>(x, bad, step, format);  // the first element refused, in flat order
    return Status::bad_value;
  }
  if (coder == SlimCoder::eg) {
    plan_ranks(counts, enc);
  } else {
    enc->layout = {0, 0};
    for (const std::vector<uint8_t>& chunk : enc->chunk_bytes) enc->layout.push_back(chunk.size());
  }
  enc->payload_bytes = 0;
  for (size_t i = 1; i < enc->layout.size(); ++i) enc->payload_bytes += enc->layout[i];
  return Status::ok;
}

// "eg": the table, then every chunk's ranks at its offset (the second pass).
template <class Fmt>
Status write_ranks(const typename Fmt::storage* x, double step, const SlimChunks& chunks, const SlimEncoding& enc,
                   uint8_t* payload) {
  const EgTable& table = enc.table;
  eg_encode_span(table.values.data(), static_cast<int64_t>(table.values.size()), 0, true, 0, payload);
  std::vector<int64_t> offset(chunks.count + 1, enc.layout[1]);
  for (int64_t c = 0; c < chunks.count; ++c) offset[c + 1] = offset[c] + enc.layout[2 + c];
  SymbolIndex index(table.alphabet);
  return try_parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
    auto q = scratch(std::min(chunks.size, chunks.numel));
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t n = chunks.length(c);
      quantize_span<Fmt>(x + chunks.begin(c), n, step, q.get(), nullptr);  // checked in the first pass
      symbols_to_ranks(q.get(), n, index, table.rank_of.data());
      eg_encode_span(q.get(), n, 0, false, 0, payload + offset[c]);  // exactly layout[2 + c] bytes
    }
  });
}

// "eg-signed", "rans": the chunks' codes back to back.
Status concatenate(const std::vector<std::vector<uint8_t>>& bytes, uint8_t* payload) {
  const int64_t count = static_cast<int64_t>(bytes.size());
  std::vector<int64_t> offset(count + 1, 0);
  for (int64_t c = 0; c < count; ++c) offset[c + 1] = offset[c] + static_cast<int64_t>(bytes[c].size());
  parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c)
      if (!bytes[c].empty()) std::memcpy(payload + offset[c], bytes[c].data(), bytes[c].size());
  });
  return Status::ok;
}

// ---- decode ----------------------------------------------------------------------------------------

// What is wrong with n EG0 codes in nbytes bytes that failed with st at symbol `where`.
std::string eg_error(EgStatus st, bool is_signed, int64_t where, int64_t n, int64_t nbytes) {
  if (st == EgStatus::kTrailing)
    return error_text(eg_status_reason(st, is_signed), " (", n, " codes in ", nbytes, " bytes)");
  return error_text(eg_status_reason(st, is_signed), " at symbol ", where, " of ", n);
}

// The next n symbols of eg (EgDecoder::decode), out of line: inlined into decode_chunk, GCC 12 schedules the
// bit reader's loop worse (measured: a bfloat16 4096×4096 "eg" decode 5-8% slower on one thread).
__attribute__((noinline)) EgStatus eg_decode_block(EgDecoder& eg, int64_t n, int32_t* q, int64_t* where) {
  return eg.decode(n, q, where);
}

// "" or what is wrong with a rANS status.
std::string rans_error(RansStatus st) { return st == RansStatus::kOk ? "" : rans_status_reason(st); }

// The words that name chunk c of a payload in its errors.
std::string chunk_error(const SlimDecodePlan& plan, const SlimChunks& chunks, int64_t c, const std::string& what) {
  return error_text("payload: chunk ", c, " of ", chunks.count, " (bytes [", plan.offset[c], ", ", plan.offset[c + 1],
                    ")): ", what);
}

// Symbols decoded and dequantized at a time: 256 KiB of int32 scratch per thread, whatever the chunk's size, so a
// decode costs its output and a bounded overhead.
constexpr int64_t kDecodeBlock = int64_t{1} << 16;

// Chunk c's bytes buf[0, nbytes) → its n values out[0, n), kDecodeBlock symbols at a time through q (scratch of
// min(n, kDecodeBlock) symbols); "" or what is wrong with the bytes.  may_overflow: as dequantize_checked.
template <class Fmt>
std::string decode_chunk(const uint8_t* buf, int64_t nbytes, int64_t n, SlimCoder coder,
                         const std::vector<int32_t>& table, double step, bool may_overflow, FloatFormat format,
                         int32_t* q, typename Fmt::storage* out) {
  const bool is_signed = coder == SlimCoder::eg_signed;
  RansDecoder rans;
  EgDecoder eg(buf, nbytes, 0, is_signed);
  if (coder == SlimCoder::rans) {
    std::string error = rans_error(rans.open(buf, nbytes, n));
    if (!error.empty()) return error;
  }
  for (int64_t b = 0; b < n; b += kDecodeBlock) {
    const int64_t len = std::min(kDecodeBlock, n - b);
    if (coder == SlimCoder::rans) {
      std::string error = rans_error(rans.decode(len, q));
      if (!error.empty()) return error;
    } else {
      int64_t where = 0;
      EgStatus st = eg_decode_block(eg, len, q, &where);
      if (st != EgStatus::kOk) return eg_error(st, is_signed, b + where, n, nbytes);
      const int64_t m = static_cast<int64_t>(table.size());
      const int64_t bad = coder == SlimCoder::eg ? ranks_to_symbols(q, len, table.data(), m) : -1;
      if (bad >= 0) return error_text("rank ", q[bad], " of symbol ", b + bad, " is outside the table of ", m);
    }
    const int64_t i = dequantize_checked<Fmt>(q, len, step, may_overflow, out + b);
    if (i >= 0)
      return error_text("symbol ", b + i, ": q = ", q[i], " times step ", g_format(step), " overflows ",
                        format_name(format), " (a step or symbol no encoder writes for this dtype)");
  }
  if (coder == SlimCoder::rans) return rans_error(rans.finish());
  EgStatus st = eg.finish();
  return st == EgStatus::kOk ? "" : eg_error(st, is_signed, n, n, nbytes);
}

template <class Fmt>
Status decode_chunks(const uint8_t* payload, const SlimDecodePlan& plan, SlimCoder coder, const SlimChunks& chunks,
                     double step, FloatFormat format, typename Fmt::storage* out, std::string* error) {
  const bool may_overflow = !range_dequantizes_finite<Fmt>(INT32_MIN, INT32_MAX, step);
  std::vector<std::string> errors(chunks.count);
  const Status status = try_parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
    auto q = scratch(std::min({kDecodeBlock, chunks.size, chunks.numel}));
    for (int64_t c = lo; c < hi; ++c)
      errors[c] = decode_chunk<Fmt>(payload + plan.offset[c], plan.offset[c + 1] - plan.offset[c], chunks.length(c),
                                    coder, plan.table, step, may_overflow, format, q.get(), out + chunks.begin(c));
  });
  if (status != Status::ok) return status;
  for (int64_t c = 0; c < chunks.count; ++c)
    if (!errors[c].empty()) {
      *error = chunk_error(plan, chunks, c, errors[c]);
      return Status::corrupt_stream;
    }
  return Status::ok;
}

}  // namespace

Status slim_encode_plan(const void* x, FloatFormat format, double step, SlimCoder coder, const SlimChunks& chunks,
                        SlimEncoding* enc, std::string* error) noexcept {
  try {
    return with_format(format, [&](auto fmt) {
      using Fmt = decltype(fmt);
      return encode_plan<Fmt>(static_cast<const typename Fmt::storage*>(x), format, step, coder, chunks, enc, error);
    });
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status slim_encode_write(const void* x, FloatFormat format, double step, SlimCoder coder, const SlimChunks& chunks,
                         const SlimEncoding& enc, uint8_t* payload) noexcept {
  try {
    if (coder != SlimCoder::eg) return concatenate(enc.chunk_bytes, payload);
    return with_format(format, [&](auto fmt) {
      using Fmt = decltype(fmt);
      return write_ranks<Fmt>(static_cast<const typename Fmt::storage*>(x), step, chunks, enc, payload);
    });
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status slim_decode_plan(const uint8_t* payload, const int64_t* layout, SlimCoder coder, const SlimChunks& chunks,
                        SlimDecodePlan* plan, std::string* error) noexcept {
  try {
    const int64_t table_count = layout[0], table_nbytes = layout[1];
    plan->offset.assign(chunks.count + 1, table_nbytes);
    for (int64_t c = 0; c < chunks.count; ++c) plan->offset[c + 1] = plan->offset[c] + layout[2 + c];
    if (coder == SlimCoder::eg) {
      plan->table.resize(table_count);  // table_count ≤ 8·table_nbytes ≤ 8·payload size: checked by the caller
      int64_t where = 0;
      const EgStatus st = eg_decode_stream(payload, table_nbytes, table_count, 0, true, plan->table.data(), &where);
      if (st != EgStatus::kOk) {
        *error = error_text("payload: the eg table: ", eg_error(st, true, where, table_count, table_nbytes));
        return Status::corrupt_stream;
      }
    }
    if (coder != SlimCoder::rans) return Status::ok;
    for (int64_t c = 0; c < chunks.count; ++c) {  // every chunk's count, table and state; its stream's length
      RansDecoder header;
      const RansStatus st = header.open(payload + plan->offset[c], plan->offset[c + 1] - plan->offset[c],
                                        chunks.length(c));
      if (st == RansStatus::kOk) continue;
      *error = chunk_error(*plan, chunks, c,
                           st == RansStatus::kCountMismatch
                               ? error_text("the rANS buffer holds ", header.stored_count(), " symbols, not ",
                                            chunks.length(c))
                               : std::string(rans_status_reason(st)));
      return Status::corrupt_stream;
    }
    return Status::ok;
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

Status slim_decode(const uint8_t* payload, const SlimDecodePlan& plan, SlimCoder coder, const SlimChunks& chunks,
                   double step, FloatFormat format, void* out, std::string* error) noexcept {
  try {
    return with_format(format, [&](auto fmt) {
      using Fmt = decltype(fmt);
      return decode_chunks<Fmt>(payload, plan, coder, chunks, step, format, static_cast<typename Fmt::storage*>(out),
                                error);
    });
  } catch (const std::bad_alloc&) {
    return Status::out_of_memory;
  }
}

}  // namespace slimrate::core

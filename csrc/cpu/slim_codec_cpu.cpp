// CPU kernels of slim_encode / slim_decode (schemas in csrc/ops.cpp; format in docs/slim-format.md): a tensor's
// symbols q = round(x/Δ) in chunks of chunk_numel, each coded on its own, so encoding and decoding run over the
// chunks in parallel (at::parallel_for) and the bytes depend only on (x, Δ, coder, chunk_numel).
//
// Encode: one fused pass per chunk quantizes straight from x's dtype (no float64 copy of the tensor), checks
// that every value has a symbol and counts the symbols (kernels/slim_codec.h).  "eg-signed" and "rans" code
// the chunk right away from its int32 scratch.  "eg" needs the table of the whole tensor first, so its chunks
// are quantized a second time (reading x costs less than keeping 4 bytes per symbol) and their ranks coded
// straight into the payload at byte offsets known from the counts.
// Decode: each chunk 2^16 symbols at a time into an int32 scratch, then q·Δ in float64 rounded once into the output
// dtype, as torch's .to(dtype) rounds it (through float32 for bfloat16 and float16).  Both directions refuse a q·Δ
// that overflows the dtype, checked from each block's smallest and largest q.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "core/arch.h"
#include "coding_inputs.h"
#include "cpu/float_formats.h"
#include "kernels/entropy_eg.h"
#include "kernels/entropy_rans.h"
#include "kernels/slim_codec.h"

namespace slimrate {
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

// int32 scratch of n symbols, one per thread.
std::unique_ptr<int32_t[]> scratch(int64_t n) { return std::unique_ptr<int32_t[]>(new int32_t[n]); }

// ---- encode ----------------------------------------------------------------------------------------

// Python's {:g} of v, as the reference words its messages.
std::string g_format(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", v);
  return text;
}

// The ValueError for the element x[i] (flat index), which has no symbol or whose q·step overflows x's dtype.
template <class Fmt>
[[noreturn]] void refuse_value(const typename Fmt::storage* x, int64_t i, double step, at::ScalarType dtype) {
  double v = load_f64<Fmt>(x[i]);
  TORCH_CHECK_VALUE(std::isfinite(v), "x: expected finite values, got ", std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf",
                    " at flat index ", i);
  char ratio[32];  // Python's {:.4g}, as ops.quantize words it
  std::snprintf(ratio, sizeof ratio, "%.4g", std::fabs(v / step));
  TORCH_CHECK_VALUE(std::fabs(v / step) < kQuantizeLimit, "x/step: |x|/step = ", ratio, " at flat index ", i,
                    " is not below 2^31 - 1, so it has no int32 symbol; use a larger step (got ", g_format(step), ")");
  const int64_t q = static_cast<int64_t>(std::nearbyint(v / step));
  TORCH_CHECK_VALUE(false, "x: ", g_format(v), " at flat index ", i, " quantizes to q = ", q, " and q·step = ",
                    g_format(static_cast<double>(q) * step), " overflows ", slim_dtype_name(dtype), " (step ",
                    g_format(step), "); use a smaller step, or coder \"raw\" to store the tensor losslessly");
}

struct Encoded {
  std::vector<std::vector<uint8_t>> bytes;  // "eg-signed", "rans": each chunk's code
  std::vector<SymbolCounts> counts;         // "eg": each chunk's counts
};

// The fused pass over every chunk; "eg-signed" and "rans" chunks are coded in it.
template <class Fmt>
Encoded quantize_and_code(const typename Fmt::storage* x, double step, SlimCoder coder, const SlimChunks& chunks,
                          at::ScalarType dtype) {
  Encoded enc;
  std::vector<int64_t> bad(chunks.count, -1);
  if (coder == SlimCoder::kEg)
    enc.counts.resize(chunks.count);
  else
    enc.bytes.resize(chunks.count);
  at::parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
    auto q = scratch(std::min(chunks.size, chunks.numel));
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t begin = chunks.begin(c), n = chunks.length(c);
      SymbolCounter counter;
      int64_t where = quantize_span<Fmt>(x + begin, n, step, q.get(), &counter);
      if (where >= 0) {
        bad[c] = begin + where;
        continue;
      }
      SymbolCounts counts = counter.finish(q.get(), n);
      if (coder == SlimCoder::kEg) {
        enc.counts[c] = std::move(counts);
      } else if (coder == SlimCoder::kEgSigned) {
        enc.bytes[c] = eg_signed_bytes(q.get(), n, counts);
      } else {
        int64_t header_bytes = 0;
        enc.bytes[c] = rans_encode_counted(q.get(), n, std::move(counts.alphabet), counts.counts, &header_bytes);
      }
    }
  });
  for (int64_t i : bad)
    if (i >= 0) refuse_value<Fmt>(x, i, step, dtype);  // the first element refused, in flat order
  return enc;
}

// "eg": the table, then every chunk's ranks at its offset (the second pass).
template <class Fmt>
std::tuple<at::Tensor, at::Tensor> code_ranks(const typename Fmt::storage* x, double step, const SlimChunks& chunks,
                                              const std::vector<SymbolCounts>& counts) {
  EgTable table = eg_table(merge_counts(counts));
  const int64_t m = static_cast<int64_t>(table.values.size());
  int64_t unused = 0;
  const int64_t table_nbytes = (eg_span_bits(table.values.data(), m, 0, true, &unused) + 7) / 8;
  SymbolIndex index(table.alphabet);
  at::Tensor layout = at::empty({2 + chunks.count}, at::dtype(at::kLong));
  int64_t* l = layout.mutable_data_ptr<int64_t>();
  l[0] = m;
  l[1] = table_nbytes;
  std::vector<int64_t> offset(chunks.count + 1, table_nbytes);
  for (int64_t c = 0; c < chunks.count; ++c) {
    int64_t bits = 0;
    for (size_t j = 0; j < counts[c].alphabet.size(); ++j)
      bits += counts[c].counts[j] * eg_length(table.rank_of[index(counts[c].alphabet[j])], 0);
    l[2 + c] = (bits + 7) / 8;
    offset[c + 1] = offset[c] + l[2 + c];
  }
  at::Tensor payload = at::empty({offset[chunks.count]}, at::dtype(at::kByte));
  uint8_t* out = payload.mutable_data_ptr<uint8_t>();
  eg_encode_span(table.values.data(), m, 0, true, 0, out);
  at::parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
    auto q = scratch(std::min(chunks.size, chunks.numel));
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t n = chunks.length(c);
      quantize_span<Fmt>(x + chunks.begin(c), n, step, q.get(), nullptr);  // checked in the first pass
      symbols_to_ranks(q.get(), n, index, table.rank_of.data());
      eg_encode_span(q.get(), n, 0, false, 0, out + offset[c]);  // exactly l[2 + c] bytes
    }
  });
  return {payload, layout};
}

// "eg-signed", "rans": the chunks' codes back to back.
std::tuple<at::Tensor, at::Tensor> concatenate(const std::vector<std::vector<uint8_t>>& bytes) {
  const int64_t count = static_cast<int64_t>(bytes.size());
  at::Tensor layout = at::zeros({2 + count}, at::dtype(at::kLong));
  int64_t* l = layout.mutable_data_ptr<int64_t>();
  std::vector<int64_t> offset(count + 1, 0);
  for (int64_t c = 0; c < count; ++c) {
    l[2 + c] = static_cast<int64_t>(bytes[c].size());
    offset[c + 1] = offset[c] + l[2 + c];
  }
  at::Tensor payload = at::empty({offset[count]}, at::dtype(at::kByte));
  uint8_t* out = payload.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c)
      if (!bytes[c].empty()) std::memcpy(out + offset[c], bytes[c].data(), bytes[c].size());
  });
  return {payload, layout};
}

std::tuple<at::Tensor, at::Tensor> slim_encode_cpu(const at::Tensor& x_in, double step, c10::string_view coder_name,
                                                   int64_t chunk_numel) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "x: expected a CPU tensor, got ", x_in.device());
  TORCH_CHECK_TYPE(is_slim_float(x_in.scalar_type()), "x: expected float32, float64, bfloat16 or float16, got ",
                   x_in.scalar_type());
  check_slim_scalars(step, chunk_numel);
  const SlimCoder coder = slim_coder(coder_name);
  const at::Tensor x = x_in.contiguous();  // a copy in x's own dtype only for a strided view
  const SlimChunks chunks(x.numel(), chunk_numel);
  return with_format(x.scalar_type(), [&](auto fmt) {
    using Fmt = decltype(fmt);
    const auto* data = data_of<Fmt>(x);
    Encoded enc = quantize_and_code<Fmt>(data, step, coder, chunks, x.scalar_type());
    return coder == SlimCoder::kEg ? code_ranks<Fmt>(data, step, chunks, enc.counts) : concatenate(enc.bytes);
  });
}

// ---- decode ----------------------------------------------------------------------------------------

// What is wrong with n EG0 codes in nbytes bytes that failed with st at symbol `where`.
std::string eg_error(EgStatus st, bool is_signed, int64_t where, int64_t n, int64_t nbytes) {
  if (st == EgStatus::kTrailing)
    return c10::str(eg_status_reason(st, is_signed), " (", n, " codes in ", nbytes, " bytes)");
  return c10::str(eg_status_reason(st, is_signed), " at symbol ", where, " of ", n);
}

// The "eg" table: table_count signed EG0 codes filling exactly table_nbytes bytes.
std::vector<int32_t> decode_table(const uint8_t* payload, int64_t table_count, int64_t table_nbytes) {
  std::vector<int32_t> table(table_count);  // table_count ≤ 8·table_nbytes ≤ 8·payload size: checked
  int64_t where = 0;
  EgStatus st = eg_decode_stream(payload, table_nbytes, table_count, 0, true, table.data(), &where);
  TORCH_CHECK_VALUE(st == EgStatus::kOk, "payload: the eg table: ",
                    eg_error(st, true, where, table_count, table_nbytes));
  return table;
}

// Symbols decoded and dequantized at a time: 256 KiB of int32 scratch per thread, whatever the chunk's size, so a
// decode costs its output and a bounded overhead.
constexpr int64_t kDecodeBlock = int64_t{1} << 16;

// "" or what is wrong with a rANS status.
std::string rans_error(RansStatus st) { return st == RansStatus::kOk ? "" : rans_status_reason(st); }

// Chunk c's bytes buf[0, nbytes) → its n values out[0, n), kDecodeBlock symbols at a time through q (scratch of
// min(n, kDecodeBlock) symbols); "" or what is wrong with the bytes.  may_overflow: as dequantize_checked.
template <class Fmt>
std::string decode_chunk(const uint8_t* buf, int64_t nbytes, int64_t n, SlimCoder coder,
                         const std::vector<int32_t>& table, double step, bool may_overflow, at::ScalarType dtype,
                         int32_t* q, typename Fmt::storage* out) {
  const bool is_signed = coder == SlimCoder::kEgSigned;
  RansDecoder rans;
  EgDecoder eg(buf, nbytes, 0, is_signed);
  if (coder == SlimCoder::kRans) {
    std::string error = rans_error(rans.open(buf, nbytes, n));
    if (!error.empty()) return error;
  }
  for (int64_t b = 0; b < n; b += kDecodeBlock) {
    const int64_t len = std::min(kDecodeBlock, n - b);
    if (coder == SlimCoder::kRans) {
      std::string error = rans_error(rans.decode(len, q));
      if (!error.empty()) return error;
    } else {
      int64_t where = 0;
      EgStatus st = eg.decode(len, q, &where);
      if (st != EgStatus::kOk) return eg_error(st, is_signed, b + where, n, nbytes);
      int64_t bad = coder == SlimCoder::kEg ? ranks_to_symbols(q, len, table.data(), static_cast<int64_t>(table.size()))
                                            : -1;
      if (bad >= 0) return c10::str("rank ", q[bad], " of symbol ", b + bad, " is outside the table of ", table.size());
    }
    const int64_t i = dequantize_checked<Fmt>(q, len, step, may_overflow, out + b);
    if (i >= 0)
      return c10::str("symbol ", b + i, ": q = ", q[i], " times step ", g_format(step), " overflows ",
                      slim_dtype_name(dtype), " (a step or symbol no encoder writes for this dtype)");
  }
  if (coder == SlimCoder::kRans) return rans_error(rans.finish());
  EgStatus st = eg.finish();
  return st == EgStatus::kOk ? "" : eg_error(st, is_signed, n, n, nbytes);
}

// "rans": every chunk's whole header (its count, table and state) and its stream's length, checked before the
// output is allocated.
void check_rans_headers(const uint8_t* bytes, const std::vector<int64_t>& offset, const SlimChunks& chunks) {
  for (int64_t c = 0; c < chunks.count; ++c) {
    RansDecoder header;
    RansStatus st = header.open(bytes + offset[c], offset[c + 1] - offset[c], chunks.length(c));
    TORCH_CHECK_VALUE(st == RansStatus::kOk, "payload: chunk ", c, " of ", chunks.count, " (bytes [", offset[c], ", ",
                      offset[c + 1], ")): ",
                      st == RansStatus::kCountMismatch ? c10::str("the rANS buffer holds ", header.stored_count(),
                                                                  " symbols, not ", chunks.length(c))
                                                       : std::string(rans_status_reason(st)));
  }
}

at::Tensor slim_decode_cpu(const at::Tensor& payload_in, const at::Tensor& layout_in, int64_t numel, double step,
                           c10::string_view coder_name, int64_t chunk_numel, at::ScalarType dtype) {
  const at::Tensor payload = checked_1d(payload_in, "payload", at::kByte);
  const at::Tensor layout = checked_1d(layout_in, "layout", at::kLong);
  TORCH_CHECK_VALUE(numel >= 0, "numel: expected an int >= 0, got ", numel);
  check_slim_scalars(step, chunk_numel);
  TORCH_CHECK_TYPE(is_slim_float(dtype), "dtype: expected float32, float64, bfloat16 or float16, got ", dtype);
  const SlimCoder coder = slim_coder(coder_name);
  const SlimChunks chunks(numel, chunk_numel);
  const std::vector<int64_t> offset = checked_slim_layout(layout, payload.numel(), chunks, coder);
  const uint8_t* bytes = payload.const_data_ptr<uint8_t>();
  const int64_t* l = layout.const_data_ptr<int64_t>();
  const std::vector<int32_t> table = coder == SlimCoder::kEg ? decode_table(bytes, l[0], l[1]) : std::vector<int32_t>{};
  if (coder == SlimCoder::kRans) check_rans_headers(bytes, offset, chunks);
  // numel: the caller's, checked against the layout and (eg, eg-signed: ≥ 1 bit per symbol; rans: each chunk's
  // header and stream length) against the payload; a rANS chunk of one repeated symbol may still state any count
  const int64_t itemsize = static_cast<int64_t>(c10::elementSize(dtype));
  TORCH_CHECK_VALUE(numel <= INT64_MAX / itemsize, "numel: ", numel, " elements of ", slim_dtype_name(dtype),
                    " exceed the largest tensor");
  at::Tensor out = at::empty({numel}, at::dtype(dtype));
  std::vector<std::string> errors(chunks.count);
  with_format(dtype, [&](auto fmt) {
    using Fmt = decltype(fmt);
    auto* o = reinterpret_cast<typename Fmt::storage*>(out.mutable_data_ptr());
    const bool may_overflow = !range_dequantizes_finite<Fmt>(INT32_MIN, INT32_MAX, step);
    at::parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
      auto q = scratch(std::min({kDecodeBlock, chunks.size, chunks.numel}));
      for (int64_t c = lo; c < hi; ++c)
        errors[c] = decode_chunk<Fmt>(bytes + offset[c], offset[c + 1] - offset[c], chunks.length(c), coder, table,
                                      step, may_overflow, dtype, q.get(), o + chunks.begin(c));
    });
  });
  for (int64_t c = 0; c < chunks.count; ++c)
    TORCH_CHECK_VALUE(errors[c].empty(), "payload: chunk ", c, " of ", chunks.count, " (bytes [", offset[c], ", ",
                      offset[c + 1], ")): ", errors[c]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("slim_encode", &slim_encode_cpu);
  m.impl("slim_decode", &slim_decode_cpu);
}

}  // namespace slimrate

// CPU kernels of slim_encode / slim_decode (schemas in csrc/ops.cpp; format in docs/slim-format.md): a tensor's
// symbols q = round(x/Δ) in chunks of chunk_numel, each coded on its own, so encoding and decoding run over the
// chunks in parallel (at::parallel_for) and the bytes depend only on (x, Δ, coder, chunk_numel).
//
// Encode: one fused pass per chunk quantizes straight from x's dtype (no float64 copy of the tensor), checks
// that every value has a symbol and counts the symbols (kernels/slim_codec.h).  "eg-signed" and "rans" code
// the chunk right away from its int32 scratch.  "eg" needs the table of the whole tensor first, so its chunks
// are quantized a second time (reading x costs less than keeping 4 bytes per symbol) and their ranks coded
// straight into the payload at byte offsets known from the counts.
// Decode: each chunk into an int32 scratch, then q·Δ in float64 rounded once into the output dtype, as torch's
// .to(dtype) rounds it (through float32 for bfloat16 and float16).
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

#include "coding_inputs.h"
#include "cpu/float_formats.h"
#include "kernels/entropy_eg.h"
#include "kernels/entropy_rans.h"
#include "kernels/slim_codec.h"

namespace slimrate {
namespace {

// AVX2 and AVX-512 round with vroundpd and vectorise the passes below; baseline x86-64 calls nearbyint.
#define SLIMRATE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

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

// out[i] = q[i]·step in float64, rounded once to Fmt: through float32 for the 16-bit formats, as torch's .to().
template <class Fmt>
SLIMRATE_CPU_CLONES void dequantize_span(const int32_t* q, int64_t n, double step, typename Fmt::storage* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = Fmt::store(static_cast<typename Fmt::compute>(static_cast<double>(q[i]) * step));
}

std::unique_ptr<int32_t[]> scratch(const SlimChunks& chunks) {
  return std::unique_ptr<int32_t[]>(new int32_t[std::min(chunks.size, chunks.numel)]);
}

// ---- encode ----------------------------------------------------------------------------------------

// The ValueError for the element x[i] (flat index), which has no symbol.
template <class Fmt>
[[noreturn]] void refuse_value(const typename Fmt::storage* x, int64_t i, double step) {
  double v = load_f64<Fmt>(x[i]);
  TORCH_CHECK_VALUE(std::isfinite(v), "x: expected finite values, got ", std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf",
                    " at flat index ", i);
  char ratio[32], got[32];  // Python's {:.4g} and {:g}, as ops.quantize words it
  std::snprintf(ratio, sizeof ratio, "%.4g", std::fabs(v / step));
  std::snprintf(got, sizeof got, "%g", step);
  TORCH_CHECK_VALUE(false, "x/step: |x|/step = ", ratio, " at flat index ", i,
                    " is not below 2^31 - 1, so it has no int32 symbol; use a larger step (got ", got, ")");
}

struct Encoded {
  std::vector<std::vector<uint8_t>> bytes;  // "eg-signed", "rans": each chunk's code
  std::vector<SymbolCounts> counts;         // "eg": each chunk's counts
};

// The fused pass over every chunk; "eg-signed" and "rans" chunks are coded in it.
template <class Fmt>
Encoded quantize_and_code(const typename Fmt::storage* x, double step, SlimCoder coder, const SlimChunks& chunks) {
  Encoded enc;
  std::vector<int64_t> bad(chunks.count, -1);
  if (coder == SlimCoder::kEg)
    enc.counts.resize(chunks.count);
  else
    enc.bytes.resize(chunks.count);
  at::parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
    auto q = scratch(chunks);
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
    if (i >= 0) refuse_value<Fmt>(x, i, step);  // the first element without a symbol, in flat order
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
    auto q = scratch(chunks);
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
    Encoded enc = quantize_and_code<Fmt>(data, step, coder, chunks);
    return coder == SlimCoder::kEg ? code_ranks<Fmt>(data, step, chunks, enc.counts) : concatenate(enc.bytes);
  });
}

// ---- decode ----------------------------------------------------------------------------------------

// The "eg" table: table_count signed EG0 codes filling exactly table_nbytes bytes.
std::vector<int32_t> decode_table(const uint8_t* payload, int64_t table_count, int64_t table_nbytes) {
  std::vector<int32_t> table(table_count);  // table_count ≤ 8·table_nbytes ≤ 8·payload size: checked
  int64_t where = 0, bits = 0;
  EgStatus st = eg_decode_stream(payload, table_nbytes, table_count, 0, true, table.data(), &where, &bits);
  TORCH_CHECK_VALUE(st == EgStatus::kOk, "payload: the eg table: ", eg_status_reason(st, true), " at symbol ", where,
                    " of ", table_count);
  TORCH_CHECK_VALUE((bits + 7) / 8 == table_nbytes, "payload: the eg table's ", table_count, " codes end in byte ",
                    (bits + 7) / 8, " of its ", table_nbytes, " (trailing bytes)");
  return table;
}

// Chunk c's symbols into q; "" or what is wrong with its bytes buf[0, nbytes).
std::string decode_chunk(const uint8_t* buf, int64_t nbytes, int64_t n, SlimCoder coder,
                         const std::vector<int32_t>& table, int32_t* q) {
  if (coder == SlimCoder::kRans) {
    RansStatus st = rans_decode_stream(buf, nbytes, n, q);
    return st == RansStatus::kOk ? "" : rans_status_reason(st);
  }
  const bool is_signed = coder == SlimCoder::kEgSigned;
  int64_t where = 0, bits = 0;
  EgStatus st = eg_decode_stream(buf, nbytes, n, 0, is_signed, q, &where, &bits);
  if (st != EgStatus::kOk) return c10::str(eg_status_reason(st, is_signed), " at symbol ", where, " of ", n);
  if ((bits + 7) / 8 != nbytes) return c10::str("its ", n, " codes end in byte ", (bits + 7) / 8, " (trailing bytes)");
  if (is_signed) return "";
  int64_t bad = ranks_to_symbols(q, n, table.data(), static_cast<int64_t>(table.size()));
  return bad < 0 ? "" : c10::str("rank ", q[bad], " of symbol ", bad, " is outside the table of ", table.size());
}

// "rans": every chunk's buffer must say it holds that chunk's symbol count, checked before the output is allocated.
void check_rans_counts(const uint8_t* bytes, const std::vector<int64_t>& offset, const SlimChunks& chunks) {
  for (int64_t c = 0; c < chunks.count; ++c) {
    ByteReader head{bytes + offset[c], bytes + offset[c + 1]};
    head.byte();  // mode
    const uint64_t stored = head.varint();
    TORCH_CHECK_VALUE(head.ok && stored == static_cast<uint64_t>(chunks.length(c)), "payload: chunk ", c, " of ",
                      chunks.count, " (bytes [", offset[c], ", ", offset[c + 1], ")): ",
                      head.ok ? c10::str("the rANS buffer holds ", stored, " symbols, not ", chunks.length(c))
                              : std::string("truncated rANS header"));
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
  if (coder == SlimCoder::kRans) check_rans_counts(bytes, offset, chunks);
  // numel: the caller's, checked against the layout and (eg, eg-signed: ≥ 1 bit per symbol; rans: the chunks'
  // counts) against the payload
  at::Tensor out = at::empty({numel}, at::dtype(dtype));
  std::vector<std::string> errors(chunks.count);
  with_format(dtype, [&](auto fmt) {
    using Fmt = decltype(fmt);
    auto* o = reinterpret_cast<typename Fmt::storage*>(out.mutable_data_ptr());
    at::parallel_for(0, chunks.count, 1, [&](int64_t lo, int64_t hi) {
      auto q = scratch(chunks);
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t n = chunks.length(c);
        errors[c] = decode_chunk(bytes + offset[c], offset[c + 1] - offset[c], n, coder, table, q.get());
        if (errors[c].empty()) dequantize_span<Fmt>(q.get(), n, step, o + chunks.begin(c));
      }
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

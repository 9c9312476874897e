// The chunked tensor codec of slim_encode / slim_decode (docs/slim-format.md) on raw pointers: a float tensor's
// symbols q = round(x/Δ), in chunks of chunk_numel coded on their own, so both directions run over the chunks
// with parallel_for and the bytes depend only on (x, Δ, coder, chunk_numel). Callers check the arguments (the
// faces do: Δ finite and > 0, chunk_numel ≥ 1, a layout consistent with the payload's size); values without a
// symbol and payloads that are not what the encoder writes are returned as Status::bad_value and
// Status::corrupt_stream, with `error` naming the element or chunk in the words the faces raise. These
// functions never throw.
//
// Encode (slim_encode_plan, then slim_encode_write into the payload the caller allocated from the plan): one fused
// pass per chunk quantizes straight from x's format (no float64 copy of the tensor), checks that every value has
// a symbol whose q·Δ is finite in that format, and counts the symbols (kernels/slim_codec.h). "eg-signed" and
// "rans" code the chunk right away from its int32 scratch. "eg" needs the table of the whole tensor first, so its
// chunks are quantized a second time (reading x costs less than keeping 4 bytes per symbol) and their ranks coded
// straight into the payload at byte offsets known from the counts.
// Decode (slim_decode_plan before the caller allocates the output, then slim_decode): each chunk 2^16 symbols at a
// time into an int32 scratch, then q·Δ in float64 rounded once into the output format, as torch's .to(dtype)
// rounds it (through float32 for bfloat16 and float16). Both directions refuse a q·Δ that overflows the format,
// checked from each block's smallest and largest q.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/float_format.h"
#include "core/status.h"
#include "kernels/slim_codec.h"

namespace slimrate::core {

enum class SlimCoder : uint8_t { eg, eg_signed, rans };

// Chunk c holds symbols [c·size, min((c+1)·size, numel)).
struct SlimChunks {
  int64_t numel, size, count;
  SlimChunks(int64_t numel, int64_t size) : numel(numel), size(size), count(numel / size + (numel % size != 0)) {}
  int64_t begin(int64_t c) const { return c * size; }
  int64_t length(int64_t c) const { return std::min(size, numel - c * size); }
};

// What the first pass of slim_encode found: the layout and what the second pass writes.
struct SlimEncoding {
  std::vector<int64_t> layout;                    // [table_count, table_nbytes, chunk_nbytes...]
  int64_t payload_bytes = 0;                      // the sum of layout[1:]
  std::vector<std::vector<uint8_t>> chunk_bytes;  // "eg-signed", "rans": each chunk's code
  EgTable table;                                  // "eg": the symbols by rank
};

// The first pass over x[0, chunks.numel) stored in `format`, quantized with step; bad_value when an element has no
// symbol (non-finite, or |x/step| ≥ 2^31 - 1) or its q·step overflows `format` (`error` names the first, in flat
// order).
Status slim_encode_plan(const void* x, FloatFormat format, double step, SlimCoder coder, const SlimChunks& chunks,
                        SlimEncoding* enc, std::string* error) noexcept;

// payload[0, enc.payload_bytes) = [table][chunk 0][chunk 1]…, from the first pass's enc of the same arguments.
Status slim_encode_write(const void* x, FloatFormat format, double step, SlimCoder coder, const SlimChunks& chunks,
                         const SlimEncoding& enc, uint8_t* payload) noexcept;

// What slim_decode needs from a payload, read before its output is allocated.
struct SlimDecodePlan {
  std::vector<int64_t> offset;  // byte offset of each chunk, then the payload's end (chunks.count + 1)
  std::vector<int32_t> table;   // "eg": the symbol of each rank
};

// The plan of payload with its layout [table_count, table_nbytes, chunk_nbytes...] (checked by the caller against
// the payload's size, chunks and coder); corrupt_stream when the "eg" table is, or a "rans" chunk's header or
// stream length is: every chunk's count is checked before the caller allocates chunks.numel values.
Status slim_decode_plan(const uint8_t* payload, const int64_t* layout, SlimCoder coder, const SlimChunks& chunks,
                        SlimDecodePlan* plan, std::string* error) noexcept;

// out[0, chunks.numel) in `format` = q·step of the payload's symbols; corrupt_stream when a chunk is not what
// slim_encode writes or a q·step overflows `format` (`error` names the first such chunk).
Status slim_decode(const uint8_t* payload, const SlimDecodePlan& plan, SlimCoder coder, const SlimChunks& chunks,
                   double step, FloatFormat format, void* out, std::string* error) noexcept;

}  // namespace slimrate::core

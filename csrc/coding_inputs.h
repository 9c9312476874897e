// Checked inputs of the entropy-coding ops (schemas in csrc/ops.cpp): the TORCH_CHECKs that keep a direct
// torch.ops.slimrate.* call memory-safe.  The Python faces (python/slimrate/ops/coding.py) check the user's
// arguments first; data-dependent errors use TORCH_CHECK_VALUE, which Python sees as ValueError.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "core/slim_codec.h"

namespace slimrate {

inline at::Tensor checked_1d(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, name, ": expected a 1-D tensor, got shape ", t.sizes());
  return t.contiguous();
}

// ---- slim_encode / slim_decode (docs/slim-format.md) ----------------------------------------------

inline core::SlimCoder slim_coder(c10::string_view name) {
  if (name == "eg") return core::SlimCoder::eg;
  if (name == "eg-signed") return core::SlimCoder::eg_signed;
  TORCH_CHECK_VALUE(name == "rans", "coder: expected \"eg\", \"eg-signed\" or \"rans\", got \"", name, "\"");
  return core::SlimCoder::rans;
}

inline bool is_slim_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

inline void check_slim_scalars(double step, int64_t chunk_numel) {
  TORCH_CHECK_VALUE(std::isfinite(step) && step > 0, "step: expected a finite value > 0, got ", step);
  TORCH_CHECK_VALUE(chunk_numel >= 1, "chunk_numel: expected an int >= 1, got ", chunk_numel);
}

// layout = [table_count, table_nbytes, chunk_nbytes...] checked against numel, chunk_numel and the payload's
// size, before anything is allocated from it (core/slim_codec.h's slim_decode_plan reads it then).
inline void check_slim_layout(const at::Tensor& layout, int64_t payload_nbytes, const core::SlimChunks& chunks,
                              core::SlimCoder coder) {
  TORCH_CHECK_VALUE(layout.numel() == 2 + chunks.count, "layout: expected 2 + ", chunks.count,
                    " entries (numel ", chunks.numel, " in chunks of ", chunks.size, "), got ", layout.numel());
  const int64_t* l = layout.const_data_ptr<int64_t>();
  const int64_t table_count = l[0], table_nbytes = l[1];
  if (coder == core::SlimCoder::eg) {
    // An EG0 code takes at least one bit; a non-empty tensor needs a non-empty table.
    TORCH_CHECK_VALUE(table_nbytes >= 0 && table_nbytes <= payload_nbytes && table_count >= 0 &&
                          table_count <= std::min(chunks.numel, 8 * table_nbytes) &&
                          (table_count > 0 || chunks.numel == 0),
                      "layout: a table of ", table_count, " symbols in ", table_nbytes, " bytes does not fit ",
                      chunks.numel, " symbols in a payload of ", payload_nbytes, " bytes");
  } else {
    TORCH_CHECK_VALUE(table_count == 0 && table_nbytes == 0, "layout: coder ",
                      coder == core::SlimCoder::rans ? "rans" : "eg-signed", " has no table, got table_count ",
                      table_count, " and table_nbytes ", table_nbytes);
  }
  int64_t offset = table_nbytes;  // of chunk c
  for (int64_t c = 0; c < chunks.count; ++c) {
    const int64_t nbytes = l[2 + c];
    TORCH_CHECK_VALUE(nbytes >= 0 && nbytes <= payload_nbytes - offset, "layout: chunk ", c, " of ", chunks.count,
                      " claims ", nbytes, " bytes at offset ", offset, " of a payload of ", payload_nbytes, " bytes");
    TORCH_CHECK_VALUE(coder == core::SlimCoder::rans || chunks.length(c) <= 8 * nbytes, "layout: chunk ", c, " of ",
                      chunks.count, ": ", chunks.length(c), " exp-Golomb codes cannot fit in ", nbytes, " bytes");
    offset += nbytes;
  }
  TORCH_CHECK_VALUE(offset == payload_nbytes, "payload: ", payload_nbytes, " bytes, but the layout accounts for ",
                    offset, " (trailing bytes or a wrong layout)");
}

}  // namespace slimrate

// The NF4 kernels (docs/qlora.md §2–§3) on raw pointers, in bitsandbytes' layout (csrc/kernels/nf4.h): W [out, in]
// flattened row-major into n weights, packed two per byte, one float32 absmax per block of `blocksize` weights.
// Callers check the inputs (the faces do); these functions never throw.
//
// quantize / dequantize reproduce bitsandbytes' bytes and values (python/slimrate/ops/reference.py states the
// arithmetic). The linear layer never holds the dequantized W: it is decoded a row segment at a time into
// per-thread float buffers (16 KiB, in L1) or a panel at a time (a few MiB, in L2/L3), each consumed at once. The
// LoRA terms and the bias are extra columns / rows of the same product (the augmented operands of
// csrc/nf4_inputs.h), so each output is accumulated in one place and rounded once. Two schedules:
// - few tokens (the *_fused functions): memory-bound on the 0.5 B/weight of packed W; a decoded segment of 4 rows is
//   used for every token while it sits in L1 (forward: dot products per token, each thread a range of output rows;
//   backward: each thread streams every row of W over its own range of dx's columns); float32 throughout, and
//   results that do not depend on the thread count;
// - many tokens (the *_panels functions): a panel of rows (forward) or of columns (backward) is decoded into a
//   buffer of the compute format (bfloat16 or float32) and handed to the caller's GEMM, which accumulates in
//   float32. Each thread decodes and multiplies its own panels.
#pragma once
#include <cstdint>

#include "core/float_format.h"
#include "core/status.h"

namespace slimrate::core {

struct NF4Weights {
  const uint8_t* packed;  // [(n + 1) / 2]: weight i in byte i/2, the high nibble when i is even
  const float* absmax;    // [⌈n / blocksize⌉]: the scale of weight i is absmax[i / blocksize]
  int64_t blocksize;      // even, > 0
};

// Blockwise NF4 of w [n] (f32, bf16 or f16): packed [(n + 1) / 2] and absmax [⌈n / blocksize⌉], the bytes of
// bitsandbytes' quantize_4bit (an odd last weight is padded with code 7, 0.0). blocksize even, > 0.
Status nf4_quantize(const void* w, FloatFormat format, int64_t n, int64_t blocksize, uint8_t* packed,
                    float* absmax) noexcept;

// out [n] in format (f32, bf16 or f16) = code[nibble]·absmax computed in float32, rounded to nearest even.
Status nf4_dequantize(const NF4Weights& w, int64_t n, FloatFormat format, void* out) noexcept;

// Double-quantized absmax: out[i] = code[qabsmax[i]]·absmax2[i / blocksize] + offset for i < n, the product
// rounded to float32 before the sum (never fused into an FMA). code [256], absmax2 [⌈n / blocksize⌉] float32;
// blocksize > 0.
Status nf4_absmax_dequantize(const uint8_t* qabsmax, int64_t n, const float* code, const float* absmax2, float offset,
                             int64_t blocksize, float* out) noexcept;

// Forward operand [W | E] [out, in + ecols]: W NF4 [out, in], E = [s·B | b] float32 [out, ecols], contiguous.
struct NF4Forward {
  NF4Weights w;
  int64_t in, out;
  const float* e;
  int64_t ecols;
};

// Backward operand [W ; A] [out + r, in]: W NF4 [out, in], A float32 [r, in] (r = 0: no LoRA term), contiguous.
struct NF4Backward {
  NF4Weights w;
  int64_t in, out;
  const float* a;
  int64_t r;
};

// Few tokens: y [M, out] float32 = xa [M, in + ecols] float32 · [W | E]ᵀ.
Status nf4_forward_fused(const NF4Forward& m, const float* xa, int64_t M, float* y) noexcept;

// Few tokens: dx [M, in] float32 = ga [M, out + r] · [W ; A], given gat = gaᵀ [out + r, M] float32.
Status nf4_backward_fused(const NF4Backward& m, const float* gat, int64_t M, float* dx) noexcept;

// The caller's GEMM for the panel schedules: run(context, panel, first, count, ld) multiplies one decoded panel
// (the layout is the panel function's) and returns false on failure. Called from several threads at once, each
// with its own panel.
struct NF4PanelGemm {
  bool (*run)(void* context, const void* panel, int64_t first, int64_t count, int64_t ld);
  void* context;
};

// Many tokens, forward: rows [first, first + count) of [W | E] decoded into a panel [count, in + ecols] in format
// (f32 or bf16), row stride ld, for gemm (which computes yᵀ[first : first + count] = panel · xaᵀ). Each thread
// (max_threads() of them) owns a contiguous range of rows, decoded in panels of about panel_bytes. Returns
// Status::callback_failed when a gemm call failed (the other threads stop at their next panel).
Status nf4_forward_panels(const NF4Forward& m, FloatFormat format, int64_t panel_bytes,
                          const NF4PanelGemm& gemm) noexcept;

// Many tokens, backward: columns [first, first + count) of [W ; A] decoded into a panel [out + r, count] in format
// (f32 or bf16), row stride ld, for gemm (dxᵀ[first : first + count] = panelᵀ · gaᵀ). Threads as in
// nf4_forward_panels, each owning a range of columns (a multiple of 64 wide).
Status nf4_backward_panels(const NF4Backward& m, FloatFormat format, int64_t panel_bytes,
                           const NF4PanelGemm& gemm) noexcept;

}  // namespace slimrate::core

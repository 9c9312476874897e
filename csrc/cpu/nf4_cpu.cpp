// CPU kernels of the NF4 ops (schemas in csrc/ops.cpp; layout in csrc/kernels/nf4.h).
//
// nf4_quantize / nf4_dequantize reproduce bitsandbytes' bytes and values (python/slimrate/ops/reference.py
// states the arithmetic).  nf4_lora_linear and nf4_linear_grad_input never hold the dequantized W: it is
// decoded a row segment at a time into thread-local float buffers (16 KiB, in L1) or a panel at a time
// (a few MiB, in L2/L3), each consumed at once.  The LoRA terms and the bias are extra columns / rows of the
// same product (the augmented operands of csrc/nf4_inputs.h), so each output is accumulated in one place and
// rounded once.  Two schedules:
// - few tokens (kFused*Tokens): memory-bound on the 0.5 B/weight of packed W; a decoded segment of 4 rows is
//   used for every token while it sits in L1 (forward: dot products per token; backward: each thread streams
//   its range of rows into its own float32 accumulator dx [M, in], summed at the end); float32 throughout;
// - many tokens: a panel of rows (forward) or of columns (backward) is decoded into a buffer of the compute
//   dtype (bfloat16 for bfloat16 activations, which the CPU multiplies fastest, else float32) and handed to
//   at::mm, whose GEMM accumulates in float32.
// Decoding: csrc/cpu/nf4_decode.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/arch.h"
#include "cpu/nf4_decode.h"
#include "kernels/nf4.h"
#include "kernels/portable.h"
#include "nf4_inputs.h"

namespace slimrate {
namespace {

// Tokens up to which the fused schedule beats decode-into-panel + GEMM, one thread, 4096×4096, r = 16 (measured
// on a shared 2-core EPYC: the forward panel's GEMM wins from ~8 tokens in float32 and ~4 in bfloat16, whose
// GEMM is 2.5× faster; the backward's column panels cost more to fill, so its fused schedule runs longer).
constexpr int64_t kFusedForwardTokens = 8;
constexpr int64_t kFusedForwardTokensBF16 = 4;
constexpr int64_t kFusedBackwardTokens = 32;
// Fused schedule: rows decoded together, and the column chunk each row segment covers (4 × 1024 floats =
// 16 KiB of decoded weights in L1 next to the tokens' slices of x or of the gradient accumulators).
constexpr int64_t kGroupRows = 4;
constexpr int64_t kChunk = 1024;
// Panel schedule: each thread decodes its own panels.  Bytes of decoded weights per panel, one thread, 512 tokens,
// 11008×4096 (L3 32 MiB): with 2/4/8/16 MiB the forward took 1.14/1.10/1.04/1.03× a plain float32 GEMM, the
// backward (column panels: short row segments, a skinny GEMM when out is large) 1.30/1.25/1.19/1.10×.
constexpr int64_t kForwardPanelBytes = int64_t{8} << 20;
constexpr int64_t kBackwardPanelBytes = int64_t{16} << 20;

// ---- quantize / dequantize ----

// Blocks [b_lo, b_hi) of w (n weights): absmax and packed codes.  A full block is scaled by w·(1/absmax), the
// last partial block by w/absmax (bitsandbytes' portable kernel does both), the floor 1e-38 keeps 0/0 away.
template <class Fmt>
SLIMRATE_CPU_CLONES void quantize_blocks(const typename Fmt::storage* w, int64_t n, int64_t bs, int64_t b_lo,
                                         int64_t b_hi, uint8_t* packed, float* absmax) {
  for (int64_t b = b_lo; b < b_hi; ++b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    const auto* wb = w + start;
    float am = 0.0f;
#pragma omp simd reduction(max : am)
    for (int64_t i = 0; i < len; ++i) am = std::max(am, std::fabs(Fmt::load(wb[i])));
    absmax[b] = am;
    const float div = std::max(am, kNF4AbsmaxFloor);
    const float inv = 1.0f / div;
    uint8_t* out = packed + start / 2;
    const int64_t pairs = len / 2;
    if (len == bs) {
#pragma omp simd
      for (int64_t j = 0; j < pairs; ++j) {
        const uint32_t h = nf4_index(nf4_clamp(Fmt::load(wb[2 * j]) * inv));
        const uint32_t l = nf4_index(nf4_clamp(Fmt::load(wb[2 * j + 1]) * inv));
        out[j] = static_cast<uint8_t>((h << 4) | l);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < pairs; ++j) {
        const uint32_t h = nf4_index(nf4_clamp(Fmt::load(wb[2 * j]) / div));
        const uint32_t l = nf4_index(nf4_clamp(Fmt::load(wb[2 * j + 1]) / div));
        out[j] = static_cast<uint8_t>((h << 4) | l);
      }
      if (len & 1) out[pairs] = static_cast<uint8_t>((nf4_index(nf4_clamp(Fmt::load(wb[len - 1]) / div)) << 4) |
                                                     kNF4PadIndex);
    }
  }
}

template <class F>
void dispatch_format(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(F32{}); break;
    case at::kBFloat16: f(BF16{}); break;
    default: f(F16{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& w, int64_t blocksize) {
  check_nf4_device(w, "w", at::kCPU);
  TORCH_CHECK(is_nf4_float(w.scalar_type()), "w: expected float32/bfloat16/float16, got ", w.scalar_type());
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize: expected an even size > 0, got ", blocksize);
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel(), nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, wc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, wc.options().dtype(at::kFloat));
  dispatch_format(wc.scalar_type(), [&](auto fmt) {
    using Fmt = decltype(fmt);
    const auto* src = reinterpret_cast<const typename Fmt::storage*>(wc.const_data_ptr());
    at::parallel_for(0, nblocks, std::max<int64_t>(1, (int64_t{1} << 14) / blocksize), [&](int64_t lo, int64_t hi) {
      quantize_blocks<Fmt>(src, n, blocksize, lo, hi, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    });
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, at::IntArrayRef shape,
                              int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK(is_nf4_float(dtype), "dtype: expected float32/bfloat16/float16, got ", dtype);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "shape: expected sizes >= 0, got ", shape);
    n *= s;
  }
  NF4Weight wt = nf4_weight(packed, absmax, n, blocksize, at::kCPU);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const NF4View w{wt.packed.const_data_ptr<uint8_t>(), wt.absmax.const_data_ptr<float>(), blocksize};
  constexpr int64_t kStep = 1 << 14;  // weights per task step
  dispatch_format(dtype, [&](auto fmt) {
    using Fmt = decltype(fmt);
    auto* dst = reinterpret_cast<typename Fmt::storage*>(out.data_ptr());
    at::parallel_for(0, (n + kStep - 1) / kStep, 1, [&](int64_t lo, int64_t hi) {
      decode_range<Fmt>(w, lo * kStep, std::min(n, hi * kStep), dst + lo * kStep);
    });
  });
  return out;
}

// absmax[i] = code[q[i]]·absmax2[i / blocksize] + offset: the product rounded to float32 before the sum (the
// build's ISO C++ mode keeps GCC from contracting them into an FMA; tests/test_nf4.py checks the bits).
at::Tensor nf4_absmax_dequantize_cpu(const at::Tensor& qabsmax, const at::Tensor& code, const at::Tensor& absmax2,
                                     const at::Tensor& offset, int64_t blocksize) {
  const NF4Nested in = nf4_nested(qabsmax, code, absmax2, offset, blocksize, at::kCPU);
  const int64_t n = in.qabsmax.numel();
  at::Tensor out = at::empty({n}, in.code.options());
  const uint8_t* q = in.qabsmax.const_data_ptr<uint8_t>();
  const float* c = in.code.const_data_ptr<float>();
  const float* a2 = in.absmax2.const_data_ptr<float>();
  const float off = in.offset.item<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, in.absmax2.numel(), std::max<int64_t>(1, (int64_t{1} << 16) / blocksize), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float s = a2[b];
      for (int64_t i = b * blocksize; i < std::min(n, (b + 1) * blocksize); ++i) {
        const float scaled = c[q[i]] * s;
        o[i] = scaled + off;
      }
    }
  });
  return out;
}

// ---- the augmented matrices, one row segment at a time, in the buffer's format ----

// Forward: row o of [W | E] (E = [s·B | b], float32 [out, ecols]) over columns [c0, c1).
template <class Fmt>
void fill_forward_row(const NF4View& w, int64_t in, const float* e, int64_t ecols, int64_t o, int64_t c0,
                      int64_t c1, typename Fmt::storage* dst) {
  const int64_t split = std::clamp(in, c0, c1);
  decode_range<Fmt>(w, o * in + c0, o * in + split, dst);
  for (int64_t c = split; c < c1; ++c) dst[c - c0] = Fmt::store(e[o * ecols + (c - in)]);
}

// Backward: row o of [W ; A] (A float32 [r, in]) over columns [c0, c1).
template <class Fmt>
void fill_backward_row(const NF4View& w, int64_t in, int64_t out, const float* a, int64_t o, int64_t c0, int64_t c1,
                       typename Fmt::storage* dst) {
  if (o < out) {
    decode_range<Fmt>(w, o * in + c0, o * in + c1, dst);
  } else {
    for (int64_t c = c0; c < c1; ++c) dst[c - c0] = Fmt::store(a[(o - out) * in + c]);
  }
}

// acc[m·4 + r] += Σ_k x[m·ldx + k]·w[r·ldw + k] for 4 rows r and m < M, k < len.
SLIMRATE_CPU_CLONES void dot_rows4(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t len,
                                   float* acc) {
  const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < len; ++k) {
      const float v = xm[k];
      s0 += v * w0[k];
      s1 += v * w1[k];
      s2 += v * w2[k];
      s3 += v * w3[k];
    }
    acc[m * 4] += s0;
    acc[m * 4 + 1] += s1;
    acc[m * 4 + 2] += s2;
    acc[m * 4 + 3] += s3;
  }
}

// acc[m·ldacc + k] += Σ_r coef[r·M + m]·w[r·ldw + k] for 4 rows r, m < M, k < len.
SLIMRATE_CPU_CLONES void axpy_rows4(const float* coef, int64_t M, const float* w, int64_t ldw, int64_t len, float* acc,
                                    int64_t ldacc) {
  const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
  for (int64_t m = 0; m < M; ++m) {
    const float a0 = coef[m], a1 = coef[M + m], a2 = coef[2 * M + m], a3 = coef[3 * M + m];
    float* am = acc + m * ldacc;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) am[k] += a0 * w0[k] + a1 * w1[k] + a2 * w2[k] + a3 * w3[k];
  }
}

// Few tokens, forward: y [M, out] float32 = xa [M, ka] · [W | E]ᵀ, 4 output rows per step.
at::Tensor forward_fused(const NF4View& w, int64_t in, int64_t out, const at::Tensor& xa, const at::Tensor& e) {
  const int64_t M = xa.size(0), ka = xa.size(1), ecols = e.size(1);
  at::Tensor y = at::empty({M, out}, xa.options());
  const float* xp = xa.const_data_ptr<float>();
  const float* ep = e.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = (out + kGroupRows - 1) / kGroupRows;
  at::parallel_for(0, groups, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> wbuf(kGroupRows * kChunk, 0.0f), acc(M * kGroupRows);
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t o0 = g * kGroupRows, rows = std::min(kGroupRows, out - o0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c0 = 0; c0 < ka; c0 += kChunk) {
        const int64_t c1 = std::min(ka, c0 + kChunk);
        for (int64_t r = 0; r < kGroupRows; ++r) {
          if (r < rows) fill_forward_row<F32>(w, in, ep, ecols, o0 + r, c0, c1, wbuf.data() + r * kChunk);
          else std::fill_n(wbuf.data() + r * kChunk, c1 - c0, 0.0f);
        }
        dot_rows4(xp + c0, ka, M, wbuf.data(), kChunk, c1 - c0, acc.data());
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r) yp[m * out + o0 + r] = acc[m * kGroupRows + r];
    }
  });
  return y;
}

// Few tokens, backward: dx [M, in] float32 = ga · [W ; A], gat = gaᵀ [out + r, M]. Each task streams its own
// range of rows (packed W read in order, 4 rows × kChunk columns decoded at a time) into its own accumulator
// [M, in] (≤ 512 KiB: in L2); the tasks' accumulators are summed at the end.
at::Tensor backward_fused(const NF4View& w, int64_t in, int64_t out, const at::Tensor& gat, const at::Tensor& a) {
  const int64_t rows = gat.size(0), M = gat.size(1);
  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), groups));
  const int64_t per = (groups + tasks - 1) / tasks * kGroupRows;  // rows per task
  at::Tensor acc = at::zeros({tasks, M, in}, gat.options());
  const float* gp = gat.const_data_ptr<float>();
  const float* ap = a.const_data_ptr<float>();
  float* accp = acc.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> wbuf(kGroupRows * kChunk, 0.0f), coef(kGroupRows * M);
    for (int64_t t = lo; t < hi; ++t) {
      float* acct = accp + t * M * in;
      const int64_t r1 = std::min(rows, (t + 1) * per);
      for (int64_t o0 = t * per; o0 < r1; o0 += kGroupRows) {
        const int64_t nr = std::min(kGroupRows, r1 - o0);
        std::fill(coef.begin(), coef.end(), 0.0f);
        std::copy(gp + o0 * M, gp + (o0 + nr) * M, coef.data());
        for (int64_t c0 = 0; c0 < in; c0 += kChunk) {
          const int64_t c1 = std::min(in, c0 + kChunk);
          for (int64_t r = 0; r < kGroupRows; ++r) {
            if (r < nr) fill_backward_row<F32>(w, in, out, ap, o0 + r, c0, c1, wbuf.data() + r * kChunk);
            else std::fill_n(wbuf.data() + r * kChunk, c1 - c0, 0.0f);
          }
          axpy_rows4(coef.data(), M, wbuf.data(), kChunk, c1 - c0, acct + c0, in);
        }
      }
    }
  });
  return tasks == 1 ? acc[0] : acc.sum(0);
}

// Fills rows [0, nrows) of buf [nrows, width] (float32 or bfloat16, row stride buf.stride(0)) with
// fill(fmt, row, destination row), in parallel (inline when called inside a panel task).
template <class Fill>
void fill_panel(at::Tensor& buf, Fill&& fill) {
  const int64_t nrows = buf.size(0), width = buf.size(1), ld = buf.stride(0);
  dispatch_format(buf.scalar_type(), [&](auto fmt) {
    using Fmt = decltype(fmt);
    auto* base = reinterpret_cast<typename Fmt::storage*>(buf.data_ptr());
    at::parallel_for(0, nrows, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, width)), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) fill(fmt, i, base + i * ld);
    });
  });
}

// bfloat16 activations multiply fastest in bfloat16 (AVX512-BF16/AMX GEMMs with float32 accumulation);
// float16 GEMMs are slow on CPUs, so float16 and float32 run in float32.
at::ScalarType panel_dtype(at::ScalarType x) { return x == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

at::Tensor nf4_lora_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& lora_x,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                               const std::optional<at::Tensor>& bias) {
  check_nf4_lora(x, lora_x, lora_A, lora_B, bias, out_features, at::kCPU);
  const int64_t M = x.size(0), in = x.size(1), out = out_features;
  NF4Weight wt = nf4_weight(packed, absmax, in * out, blocksize, at::kCPU);
  const NF4View w{wt.packed.const_data_ptr<uint8_t>(), wt.absmax.const_data_ptr<float>(), blocksize};
  const NF4ForwardOperands op = nf4_forward_operands(x, lora_x, lora_A, lora_B, scaling, bias);
  const float* ep = op.e.const_data_ptr<float>();
  const int64_t ecols = op.e.size(1), ka = op.xa.size(1);
  at::Tensor y;
  if (M <= (x.scalar_type() == at::kBFloat16 ? kFusedForwardTokensBF16 : kFusedForwardTokens)) {
    y = forward_fused(w, in, out, op.xa, op.e);
  } else {
    auto fill_rows = [&](at::Tensor& buf, int64_t o0, int64_t) {
      fill_panel(buf, [&](auto fmt, int64_t i, auto* dst) {
        fill_forward_row<decltype(fmt)>(w, in, ep, ecols, o0 + i, 0, ka, dst);
      });
    };
    y = nf4_forward_panels(op.xa.to(panel_dtype(x.scalar_type())), out, kForwardPanelBytes, at::get_num_threads(),
                           fill_rows);
  }
  return y.to(x.scalar_type()).contiguous();
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t in_features, int64_t blocksize,
                                     const std::optional<at::Tensor>& lora_grad_h,
                                     const std::optional<at::Tensor>& lora_A) {
  check_nf4_grad_input(grad_y, in_features, lora_grad_h, lora_A, at::kCPU);
  const int64_t M = grad_y.size(0), out = grad_y.size(1), in = in_features;
  NF4Weight wt = nf4_weight(packed, absmax, in * out, blocksize, at::kCPU);
  const NF4View w{wt.packed.const_data_ptr<uint8_t>(), wt.absmax.const_data_ptr<float>(), blocksize};
  const NF4BackwardOperands op = nf4_backward_operands(grad_y, in, lora_grad_h, lora_A);
  const float* ap = op.a.const_data_ptr<float>();
  at::Tensor dx;
  if (M <= kFusedBackwardTokens) {
    dx = backward_fused(w, in, out, op.ga.t().contiguous(), op.a);
  } else {
    auto fill_cols = [&](at::Tensor& buf, int64_t c0, int64_t cols) {
      fill_panel(buf, [&](auto fmt, int64_t i, auto* dst) {
        fill_backward_row<decltype(fmt)>(w, in, out, ap, i, c0, c0 + cols, dst);
      });
    };
    dx = nf4_backward_panels(op.ga.to(panel_dtype(grad_y.scalar_type())), in, kBackwardPanelBytes,
                             at::get_num_threads(), fill_cols);
  }
  return dx.to(grad_y.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_absmax_dequantize", &nf4_absmax_dequantize_cpu);
  m.impl("nf4_lora_linear", &nf4_lora_linear_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

}  // namespace slimrate

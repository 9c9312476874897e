// CPU face of the NF4 ops (schemas in csrc/ops.cpp): checks (nf4_inputs.h), the augmented operands, allocation,
// then the torch-free kernels of csrc/core/nf4.h on raw pointers; the many-token schedules multiply their decoded
// panels with at::mm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <exception>
#include <mutex>

#include "core/nf4.h"
#include "cpu/core_face.h"
#include "cpu/float_formats.h"
#include "nf4_inputs.h"

namespace slimrate {
namespace {

// Tokens up to which the fused schedule beats decode-into-panel + GEMM, one thread, 4096×4096, r = 16 (measured
// on a shared 2-core EPYC: the forward panel's GEMM wins from ~8 tokens in float32 and ~4 in bfloat16, whose
// GEMM is 2.5× faster; the backward's column panels cost more to fill, so its fused schedule runs longer).
constexpr int64_t kFusedForwardTokens = 8;
constexpr int64_t kFusedForwardTokensBF16 = 4;
constexpr int64_t kFusedBackwardTokens = 32;
// Panel schedule: each thread decodes its own panels.  Bytes of decoded weights per panel, one thread, 512 tokens,
// 11008×4096 (L3 32 MiB): with 2/4/8/16 MiB the forward took 1.14/1.10/1.04/1.03× a plain float32 GEMM, the
// backward (column panels: short row segments, a skinny GEMM when out is large) 1.30/1.25/1.19/1.10×.
constexpr int64_t kForwardPanelBytes = int64_t{8} << 20;
constexpr int64_t kBackwardPanelBytes = int64_t{16} << 20;

core::NF4Weights weights_of(const NF4Weight& wt) {
  return {wt.packed.const_data_ptr<uint8_t>(), wt.absmax.const_data_ptr<float>(), wt.blocksize};
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& w, int64_t blocksize) {
  check_nf4_device(w, "w", at::kCPU);
  TORCH_CHECK(is_nf4_float(w.scalar_type()), "w: expected float32/bfloat16/float16, got ", w.scalar_type());
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize: expected an even size > 0, got ", blocksize);
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel(), nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, wc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, wc.options().dtype(at::kFloat));
  use_torch_threads();
  check_core(core::nf4_quantize(wc.const_data_ptr(), format_of(wc.scalar_type()), n, blocksize,
                                packed.data_ptr<uint8_t>(), absmax.data_ptr<float>()));
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
  use_torch_threads();
  check_core(core::nf4_dequantize(weights_of(wt), n, format_of(dtype), out.data_ptr()));
  return out;
}

at::Tensor nf4_absmax_dequantize_cpu(const at::Tensor& qabsmax, const at::Tensor& code, const at::Tensor& absmax2,
                                     const at::Tensor& offset, int64_t blocksize) {
  const NF4Nested in = nf4_nested(qabsmax, code, absmax2, offset, blocksize, at::kCPU);
  const int64_t n = in.qabsmax.numel();
  at::Tensor out = at::empty({n}, in.code.options());
  use_torch_threads();
  check_core(core::nf4_absmax_dequantize(in.qabsmax.const_data_ptr<uint8_t>(), n, in.code.const_data_ptr<float>(),
                                         in.absmax2.const_data_ptr<float>(), in.offset.item<float>(), blocksize,
                                         out.data_ptr<float>()));
  return out;
}

// bfloat16 activations multiply fastest in bfloat16 (AVX512-BF16/AMX GEMMs with float32 accumulation);
// float16 GEMMs are slow on CPUs, so float16 and float32 run in float32.
at::ScalarType panel_dtype(at::ScalarType x) { return x == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

// The GEMM of the core's panel schedules: out's rows [first, first + count) = panel · operand, the panel holding
// [count, operand rows] (forward: rows of [W | E]) or, transposed, [operand rows, count] (backward: columns of
// [W ; A]), row stride ld. The first exception is kept, and rethrown by check() once the core has returned.
struct PanelGemm {
  at::Tensor out;      // yᵀ [out, M] or dxᵀ [in, M], in the panel dtype
  at::Tensor operand;  // xaᵀ [in + ecols, M] or gaᵀ [out + r, M], in the panel dtype
  bool transposed;
  std::exception_ptr error;
  std::mutex lock;

  static bool run(void* context, const void* panel, int64_t first, int64_t count, int64_t ld) {
    auto& g = *static_cast<PanelGemm*>(context);
    try {
      const int64_t k = g.operand.size(0);
      void* data = const_cast<void*>(panel);
      at::Tensor part = g.transposed ? at::from_blob(data, {k, count}, {ld, 1}, g.operand.options()).t()
                                     : at::from_blob(data, {count, k}, {ld, 1}, g.operand.options());
      at::Tensor out_rows = g.out.narrow(0, first, count);
      at::mm_out(out_rows, part, g.operand);
      return true;
    } catch (...) {
      std::lock_guard<std::mutex> guard(g.lock);
      if (!g.error) g.error = std::current_exception();
      return false;
    }
  }

  core::NF4PanelGemm callback() { return {&PanelGemm::run, this}; }

  void check(core::Status status) {
    if (error) std::rethrow_exception(error);
    check_core(status);
  }
};

at::Tensor nf4_lora_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& lora_x,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                               const std::optional<at::Tensor>& bias) {
  check_nf4_lora(x, lora_x, lora_A, lora_B, bias, out_features, at::kCPU);
  const int64_t M = x.size(0), in = x.size(1), out = out_features;
  NF4Weight wt = nf4_weight(packed, absmax, in * out, blocksize, at::kCPU);
  const NF4ForwardOperands op = nf4_forward_operands(x, lora_x, lora_A, lora_B, scaling, bias);
  const core::NF4Forward m{weights_of(wt), in, out, op.e.const_data_ptr<float>(), op.e.size(1)};
  use_torch_threads();
  at::Tensor y;
  if (M <= (x.scalar_type() == at::kBFloat16 ? kFusedForwardTokensBF16 : kFusedForwardTokens)) {
    y = at::empty({M, out}, op.xa.options());
    check_core(core::nf4_forward_fused(m, op.xa.const_data_ptr<float>(), M, y.data_ptr<float>()));
  } else {
    const at::ScalarType dtype = panel_dtype(x.scalar_type());
    PanelGemm gemm{at::empty({out, M}, op.xa.options().dtype(dtype)), op.xa.to(dtype).t(), false, {}, {}};
    gemm.check(core::nf4_forward_panels(m, format_of(dtype), kForwardPanelBytes, gemm.callback()));
    y = gemm.out.t();
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
  const NF4BackwardOperands op = nf4_backward_operands(grad_y, in, lora_grad_h, lora_A);
  const core::NF4Backward m{weights_of(wt), in, out, op.a.const_data_ptr<float>(), op.a.size(0)};
  use_torch_threads();
  at::Tensor dx;
  if (M <= kFusedBackwardTokens) {
    const at::Tensor gat = op.ga.t().contiguous();  // [out + r, M]
    dx = at::empty({M, in}, op.ga.options());
    check_core(core::nf4_backward_fused(m, gat.const_data_ptr<float>(), M, dx.data_ptr<float>()));
  } else {
    const at::ScalarType dtype = panel_dtype(grad_y.scalar_type());
    PanelGemm gemm{at::empty({in, M}, op.ga.options().dtype(dtype)), op.ga.to(dtype).t(), true, {}, {}};
    gemm.check(core::nf4_backward_panels(m, format_of(dtype), kBackwardPanelBytes, gemm.callback()));
    dx = gemm.out.t();
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

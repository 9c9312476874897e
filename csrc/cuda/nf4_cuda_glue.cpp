// ATen glue of the CUDA NF4 ops (schemas in csrc/ops.cpp, kernels in nf4_cuda.cu): the checks of
// csrc/nf4_inputs.h, the augmented operands and panel schedule shared with the CPU, launches on the current
// stream.  Few tokens (M <= kNF4CudaFusedTokens) run the fused kernels; more take decoded panels (64 MiB) and
// cuBLAS through at::mm in the activations' dtype (float32 accumulation).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cuda/nf4_cuda.h"
#include "nf4_inputs.h"

namespace slimrate {
namespace {

constexpr int64_t kPanelBytes = int64_t{64} << 20;
// Backward few-token chunks: rows per thread, enough chunks to fill the GPU for in = 4096 (16 column blocks).
constexpr int64_t kRowsPerChunk = 128;

NF4Kind kind_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return NF4Kind::F32;
    case at::kBFloat16: return NF4Kind::BF16;
    default: return NF4Kind::F16;  // the checks admit only these three
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

NF4Weights weights_of(const NF4Weight& wt) {
  return {wt.packed.const_data_ptr<uint8_t>(), wt.absmax.const_data_ptr<float>(), wt.blocksize};
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& w, int64_t blocksize) {
  TORCH_CHECK(w.is_cuda(), "w: expected a CUDA tensor, got ", w.device());
  c10::cuda::CUDAGuard guard(w.device());
  TORCH_CHECK(is_nf4_float(w.scalar_type()), "w: expected float32/bfloat16/float16, got ", w.scalar_type());
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize: expected an even size > 0, got ", blocksize);
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, wc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, wc.options().dtype(at::kFloat));
  check_launch(nf4_quantize_cuda_launch(kind_of(wc.scalar_type()), wc.const_data_ptr(), n, blocksize,
                                        packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), stream_of(w.device())),
               "nf4_quantize");
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, at::IntArrayRef shape,
                               int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK(packed.is_cuda(), "packed: expected a CUDA tensor, got ", packed.device());
  c10::cuda::CUDAGuard guard(packed.device());
  TORCH_CHECK(is_nf4_float(dtype), "dtype: expected float32/bfloat16/float16, got ", dtype);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "shape: expected sizes >= 0, got ", shape);
    n *= s;
  }
  const NF4Weight wt = nf4_weight(packed, absmax, n, blocksize, packed.device());
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  check_launch(nf4_dequantize_cuda_launch(kind_of(dtype), weights_of(wt), n, out.data_ptr(), stream_of(packed.device())),
               "nf4_dequantize");
  return out;
}

at::Tensor nf4_absmax_dequantize_cuda(const at::Tensor& qabsmax, const at::Tensor& code, const at::Tensor& absmax2,
                                      const at::Tensor& offset, int64_t blocksize) {
  TORCH_CHECK(qabsmax.is_cuda(), "qabsmax: expected a CUDA tensor, got ", qabsmax.device());
  c10::cuda::CUDAGuard guard(qabsmax.device());
  const NF4Nested in = nf4_nested(qabsmax, code, absmax2, offset, blocksize, qabsmax.device());
  at::Tensor out = at::empty({in.qabsmax.numel()}, in.code.options());
  check_launch(nf4_absmax_dequantize_cuda_launch(in.qabsmax.const_data_ptr<uint8_t>(), in.code.const_data_ptr<float>(),
                                                 in.absmax2.const_data_ptr<float>(), in.offset.const_data_ptr<float>(),
                                                 out.numel(), blocksize, out.data_ptr<float>(),
                                                 stream_of(qabsmax.device())),
               "nf4_absmax_dequantize");
  return out;
}

at::Tensor nf4_lora_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t out_features, int64_t blocksize, const std::optional<at::Tensor>& lora_x,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  const at::Device device = x.device();
  c10::cuda::CUDAGuard guard(device);
  check_nf4_lora(x, lora_x, lora_A, lora_B, bias, out_features, device);
  const int64_t M = x.size(0), in = x.size(1), out = out_features;
  const NF4Weights w = weights_of(nf4_weight(packed, absmax, in * out, blocksize, device));
  const NF4ForwardOperands op = nf4_forward_operands(x, lora_x, lora_A, lora_B, scaling, bias);
  const float* ep = op.e.const_data_ptr<float>();
  const int64_t ecols = op.e.size(1), ka = op.xa.size(1);
  const cudaStream_t stream = stream_of(device);
  at::Tensor y;
  if (M <= kNF4CudaFusedTokens) {
    y = at::empty({M, out}, op.xa.options());
    check_launch(nf4_forward_fused_cuda_launch(w, in, out, op.xa.const_data_ptr<float>(), M, ka, ep, ecols,
                                               y.data_ptr<float>(), stream),
                 "nf4_lora_linear");
  } else {
    auto fill_rows = [&](at::Tensor& buf, int64_t o0, int64_t rows) {
      check_launch(nf4_fill_forward_panel_cuda_launch(kind_of(buf.scalar_type()), w, in, ep, ecols, o0, rows, ka,
                                                      buf.data_ptr(), stream),
                   "nf4_lora_linear");
    };
    y = nf4_forward_panels(op.xa.to(x.scalar_type()), out, kPanelBytes, fill_rows);
  }
  return y.to(x.scalar_type()).contiguous();
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                      int64_t in_features, int64_t blocksize,
                                      const std::optional<at::Tensor>& lora_grad_h,
                                      const std::optional<at::Tensor>& lora_A) {
  TORCH_CHECK(grad_y.is_cuda(), "grad_y: expected a CUDA tensor, got ", grad_y.device());
  const at::Device device = grad_y.device();
  c10::cuda::CUDAGuard guard(device);
  check_nf4_grad_input(grad_y, in_features, lora_grad_h, lora_A, device);
  const int64_t M = grad_y.size(0), out = grad_y.size(1), in = in_features;
  const NF4Weights w = weights_of(nf4_weight(packed, absmax, in * out, blocksize, device));
  const NF4BackwardOperands op = nf4_backward_operands(grad_y, in, lora_grad_h, lora_A);
  const float* ap = op.a.const_data_ptr<float>();
  const int64_t rows = op.ga.size(1);
  const cudaStream_t stream = stream_of(device);
  at::Tensor dx;
  if (M <= kNF4CudaFusedTokens) {
    const int64_t chunks = std::clamp<int64_t>((rows + kRowsPerChunk - 1) / kRowsPerChunk, 1, 65535);
    const int64_t per = (rows + chunks - 1) / chunks;
    at::Tensor partial = at::empty({chunks, M, in}, op.ga.options());
    const at::Tensor gat = op.ga.t().contiguous();
    check_launch(nf4_backward_fused_cuda_launch(w, in, out, gat.const_data_ptr<float>(), M, rows, ap, per, chunks,
                                                partial.data_ptr<float>(), stream),
                 "nf4_linear_grad_input");
    dx = partial.sum(0);
  } else {
    auto fill_cols = [&](at::Tensor& buf, int64_t c0, int64_t cols) {
      check_launch(nf4_fill_backward_panel_cuda_launch(kind_of(buf.scalar_type()), w, in, out, ap, rows, c0, cols,
                                                       buf.stride(0), buf.data_ptr(), stream),
                   "nf4_linear_grad_input");
    };
    dx = nf4_backward_panels(op.ga.to(grad_y.scalar_type()), in, kPanelBytes, fill_cols);
  }
  return dx.to(grad_y.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(slimrate, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_absmax_dequantize", &nf4_absmax_dequantize_cuda);
  m.impl("nf4_lora_linear", &nf4_lora_linear_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

}  // namespace slimrate

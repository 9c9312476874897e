// Checked inputs of the NF4 ops (schemas in csrc/ops.cpp): the ATen glue shared by csrc/cpu and csrc/cuda.
// These checks keep a direct torch.ops.slimrate.nf4_* call memory-safe; the Python face
// (python/slimrate/ops/nf4.py) checks the user's arguments first, with friendlier messages.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace slimrate {

inline bool is_nf4_float(at::ScalarType st) { return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf; }

inline void check_nf4_device(const at::Tensor& t, const char* what, const at::Device& device) {
  TORCH_CHECK(t.device() == device, what, ": expected a tensor on ", device, ", got ", t.device());
}

// packed: uint8, (n + 1) / 2 bytes; absmax: float32, ceil(n / blocksize) values; blocksize even and > 0.
// Returns contiguous flat copies (views when already so).
struct NF4Weight {
  at::Tensor packed, absmax;
  int64_t n = 0, blocksize = 0;
};

inline NF4Weight nf4_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t n, int64_t blocksize,
                            const at::Device& device) {
  check_nf4_device(packed, "packed", device);
  check_nf4_device(absmax, "absmax", device);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed: expected uint8 NF4 bytes, got ", packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax: expected float32, got ", absmax.scalar_type());
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize: expected an even size > 0, got ", blocksize);
  TORCH_CHECK(n >= 0, "shape: expected sizes >= 0");
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed: expected (n + 1) / 2 = ", (n + 1) / 2, " bytes for n = ", n,
              " weights, got ", packed.numel());
  TORCH_CHECK(absmax.numel() == (n + blocksize - 1) / blocksize, "absmax: expected ceil(n / blocksize) = ",
              (n + blocksize - 1) / blocksize, " values for n = ", n, " and blocksize = ", blocksize, ", got ",
              absmax.numel());
  return NF4Weight{packed.reshape(-1).contiguous(), absmax.reshape(-1).contiguous(), n, blocksize};
}

// Double-quantized absmax: qabsmax uint8 [nb], code float32 [256], absmax2 float32 [ceil(nb / blocksize)],
// offset float32 with one element.  Returns contiguous copies (views when already so).
struct NF4Nested {
  at::Tensor qabsmax, code, absmax2, offset;
};

inline NF4Nested nf4_nested(const at::Tensor& qabsmax, const at::Tensor& code, const at::Tensor& absmax2,
                            const at::Tensor& offset, int64_t blocksize, const at::Device& device) {
  check_nf4_device(qabsmax, "qabsmax", device);
  check_nf4_device(code, "code", device);
  check_nf4_device(absmax2, "absmax2", device);
  check_nf4_device(offset, "offset", device);
  TORCH_CHECK(qabsmax.scalar_type() == at::kByte, "qabsmax: expected uint8, got ", qabsmax.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256, "code: expected 256 float32 values, got ",
              code.numel(), " ", code.scalar_type());
  TORCH_CHECK(absmax2.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat,
              "absmax2, offset: expected float32, got ", absmax2.scalar_type(), " and ", offset.scalar_type());
  TORCH_CHECK(offset.numel() == 1, "offset: expected one value, got ", offset.numel());
  TORCH_CHECK(blocksize > 0, "blocksize: expected > 0, got ", blocksize);
  TORCH_CHECK(absmax2.numel() == (qabsmax.numel() + blocksize - 1) / blocksize, "absmax2: expected ceil(",
              qabsmax.numel(), " / ", blocksize, ") values, got ", absmax2.numel());
  return {qabsmax.reshape(-1).contiguous(), code.contiguous(), absmax2.reshape(-1).contiguous(),
          offset.reshape(-1).contiguous()};
}

// x [M, in] float; lora_x like x or None; lora_A [r, in], lora_B [out, r] float; bias [out] float or None.
inline void check_nf4_lora(const at::Tensor& x, const std::optional<at::Tensor>& lora_x, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, const std::optional<at::Tensor>& bias, int64_t out_features,
                           const at::Device& device) {
  check_nf4_device(x, "x", device);
  check_nf4_device(lora_A, "lora_A", device);
  check_nf4_device(lora_B, "lora_B", device);
  TORCH_CHECK(is_nf4_float(x.scalar_type()), "x: expected float32/bfloat16/float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [M, in_features] tensor, got shape ", x.sizes());
  TORCH_CHECK(out_features >= 0, "out_features: expected >= 0, got ", out_features);
  TORCH_CHECK(is_nf4_float(lora_A.scalar_type()) && is_nf4_float(lora_B.scalar_type()),
              "lora_A, lora_B: expected float32/bfloat16/float16, got ", lora_A.scalar_type(), " and ",
              lora_B.scalar_type());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1), "lora_A: expected shape [r, ", x.size(1), "], got ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out_features && lora_B.size(1) == lora_A.size(0),
              "lora_B: expected shape [", out_features, ", ", lora_A.size(0), "] (rank of lora_A), got ",
              lora_B.sizes());
  if (lora_x.has_value()) {
    check_nf4_device(*lora_x, "lora_x", device);
    TORCH_CHECK(lora_x->sizes() == x.sizes() && lora_x->scalar_type() == x.scalar_type(),
                "lora_x: expected shape ", x.sizes(), " and dtype ", x.scalar_type(), " like x, got ", lora_x->sizes(),
                " and ", lora_x->scalar_type());
  }
  if (bias.has_value()) {
    check_nf4_device(*bias, "bias", device);
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "bias: expected a float dtype, got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias: expected shape [", out_features, "], got ",
                bias->sizes());
  }
}

// grad_y [M, out] float; lora_grad_h [M, r] and lora_A [r, in] float, both or neither.
inline void check_nf4_grad_input(const at::Tensor& grad_y, int64_t in_features,
                                 const std::optional<at::Tensor>& lora_grad_h, const std::optional<at::Tensor>& lora_A,
                                 const at::Device& device) {
  check_nf4_device(grad_y, "grad_y", device);
  TORCH_CHECK(is_nf4_float(grad_y.scalar_type()), "grad_y: expected float32/bfloat16/float16, got ",
              grad_y.scalar_type());
  TORCH_CHECK(grad_y.dim() == 2, "grad_y: expected a 2-D [M, out_features] tensor, got shape ", grad_y.sizes());
  TORCH_CHECK(in_features >= 0, "in_features: expected >= 0, got ", in_features);
  TORCH_CHECK(lora_grad_h.has_value() == lora_A.has_value(), "lora_grad_h, lora_A: pass both or neither");
  if (lora_A.has_value()) {
    check_nf4_device(*lora_grad_h, "lora_grad_h", device);
    check_nf4_device(*lora_A, "lora_A", device);
    TORCH_CHECK(is_nf4_float(lora_grad_h->scalar_type()) && is_nf4_float(lora_A->scalar_type()),
                "lora_grad_h, lora_A: expected float32/bfloat16/float16");
    TORCH_CHECK(lora_A->dim() == 2 && lora_A->size(1) == in_features, "lora_A: expected shape [r, ", in_features,
                "], got ", lora_A->sizes());
    TORCH_CHECK(lora_grad_h->dim() == 2 && lora_grad_h->size(0) == grad_y.size(0) &&
                    lora_grad_h->size(1) == lora_A->size(0),
                "lora_grad_h: expected shape [", grad_y.size(0), ", ", lora_A->size(0), "], got ", lora_grad_h->sizes());
  }
}

// ---- the augmented operands and the panel schedule, shared by the CPU and CUDA glue ----
// The LoRA terms and the bias ride along as extra columns / rows of the one product per output, so each
// output is accumulated in one place and rounded once:
//   forward   y  = [x | h | 1] · [W | s·B | b]ᵀ     h = lora_x·Aᵀ           xa [M, in + r (+1)], e = [s·B | b]
//   backward  dx = [g | gh] · [W ; A]                gh = s·(g·B) (given)    ga [M, out (+ r)]
struct NF4ForwardOperands {
  at::Tensor xa;  // [M, in + r (+1)] float32
  at::Tensor e;   // [out, r (+1)] float32
};

inline NF4ForwardOperands nf4_forward_operands(const at::Tensor& x, const std::optional<at::Tensor>& lora_x,
                                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                               const std::optional<at::Tensor>& bias) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor lx = lora_x.has_value() ? lora_x->to(at::kFloat) : xf;
  std::vector<at::Tensor> xcols{xf, at::mm(lx, lora_A.to(at::kFloat).t())}, ecols{lora_B.to(at::kFloat) * scaling};
  if (bias.has_value()) {
    xcols.push_back(at::ones({x.size(0), 1}, xf.options()));
    ecols.push_back(bias->to(at::kFloat).unsqueeze(1));
  }
  return {at::cat(xcols, 1).contiguous(), at::cat(ecols, 1).contiguous()};
}

struct NF4BackwardOperands {
  at::Tensor ga;  // [M, out (+ r)] float32
  at::Tensor a;   // [r, in] float32, or [0, in] without LoRA term
};

inline NF4BackwardOperands nf4_backward_operands(const at::Tensor& grad_y, int64_t in_features,
                                                 const std::optional<at::Tensor>& lora_grad_h,
                                                 const std::optional<at::Tensor>& lora_A) {
  const at::Tensor gf = grad_y.to(at::kFloat);
  if (!lora_A.has_value()) return {gf.contiguous(), at::empty({0, in_features}, gf.options())};
  return {at::cat({gf, lora_grad_h->to(at::kFloat)}, 1).contiguous(), lora_A->to(at::kFloat).contiguous()};
}

// Many tokens (the CUDA glue; the CPU's panel schedule is csrc/core/nf4.h's): yᵀ [out, M] = [W | E] · xaᵀ one
// panel of output rows at a time, the GEMM by at::mm in xa's dtype (float32 accumulation). fill_rows(buf, o0, rows)
// writes rows o0.. of [W | E] into buf [rows, ka].
template <class FillRows>
at::Tensor nf4_forward_panels(const at::Tensor& xa, int64_t out, int64_t panel_bytes, FillRows&& fill_rows) {
  const int64_t M = xa.size(0), ka = xa.size(1);
  const int64_t fit = panel_bytes / (std::max<int64_t>(1, ka) * xa.element_size());
  const int64_t panel = std::max<int64_t>(1, std::min(out, std::max<int64_t>(16, fit)));
  at::Tensor yt = at::empty({out, M}, xa.options());
  at::Tensor buf = at::empty({panel, ka}, xa.options());
  for (int64_t o0 = 0; o0 < out; o0 += panel) {
    const int64_t rows = std::min(panel, out - o0);
    at::Tensor part = buf.narrow(0, 0, rows);
    fill_rows(part, o0, rows);
    at::Tensor yslice = yt.narrow(0, o0, rows);
    at::mm_out(yslice, part, xa.t());
  }
  return yt.t();
}

// Many tokens (the CUDA glue): dxᵀ [in, M] = [W ; A]ᵀ · gaᵀ one panel of input columns at a time (a multiple of
// 64 wide). fill_cols(buf, c0, cols) writes columns c0.. of every row of [W ; A] into buf [out + r, cols] (row
// stride = buf.stride(0)).
template <class FillCols>
at::Tensor nf4_backward_panels(const at::Tensor& ga, int64_t in, int64_t panel_bytes, FillCols&& fill_cols) {
  const int64_t M = ga.size(0), rows = ga.size(1);
  const int64_t fit = panel_bytes / (std::max<int64_t>(1, rows) * ga.element_size());
  const int64_t width = std::max<int64_t>(1, std::min(in, std::max<int64_t>(64, fit / 64 * 64)));
  at::Tensor dxt = at::empty({in, M}, ga.options());
  at::Tensor buf = at::empty({rows, width}, ga.options());
  for (int64_t c0 = 0; c0 < in; c0 += width) {
    const int64_t cols = std::min(width, in - c0);
    at::Tensor part = buf.narrow(1, 0, cols);
    fill_cols(part, c0, cols);
    at::Tensor dslice = dxt.narrow(0, c0, cols);
    at::mm_out(dslice, part.t(), ga.t());
  }
  return dxt.t();
}

}  // namespace slimrate

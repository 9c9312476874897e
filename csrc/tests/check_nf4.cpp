// Checkers of the NF4 kernels (core/nf4.h): cases "nf4_quantize", "nf4_dequantize", "nf4_absmax_dequantize" and
// "nf4_linear" from tools/core_cases.py.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/nf4.h"
#include "tests/check.h"

namespace slimrate::tests {
namespace {

template <class T>
const T* data_as(const Array& a) {
  return reinterpret_cast<const T*>(a.bytes.data());
}

std::vector<double> to_doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }

core::NF4Weights weights_of(const Case& c) {
  return {data_as<uint8_t>(c.get("packed")), data_as<float>(c.get("absmax")),
          static_cast<int64_t>(c.scalar("blocksize"))};
}

// A [rows, cols] array's values as float32 (every case float is exact in float32).
std::vector<float> floats(const Array& a) {
  std::vector<double> v = a.values();
  return {v.begin(), v.end()};
}

// The GEMM the panel schedules call: out[first + i][t] += Σ_k panel(i, k)·operand[t][k] in float64, rounded once
// to float32, with the operand rounded to the panel's format first (as the ATen face converts it).
template <class Fmt>
struct NaiveGemm {
  std::vector<float> operand;  // [M, k], values rounded through Fmt
  int64_t M, k;
  bool transposed;             // panel [k, count] (backward) instead of [count, k] (forward)
  std::vector<float>* out;     // [rows of out, M]

  static bool run(void* context, const void* panel, int64_t first, int64_t count, int64_t ld) {
    const auto& g = *static_cast<NaiveGemm*>(context);
    const auto* p = static_cast<const typename Fmt::storage*>(panel);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t t = 0; t < g.M; ++t) {
        double sum = 0.0;
        for (int64_t j = 0; j < g.k; ++j)
          sum += double{Fmt::load(g.transposed ? p[j * ld + i] : p[i * ld + j])} * g.operand[t * g.k + j];
        (*g.out)[(first + i) * g.M + t] = static_cast<float>(sum);
      }
    return true;
  }
};

// Runs a panel schedule with NaiveGemm in format (bf16 when the activations are, else f32, as the face) and
// returns the product [M, n] from the transposed result [n, M].
template <class Schedule>
std::vector<float> run_panels(core::FloatFormat format, const std::vector<float>& operand, int64_t M, int64_t k,
                              int64_t n, bool transposed, Verdict& v, const Schedule& schedule) {
  std::vector<float> outt(n * M), out(M * n);
  core::with_f32_f16_format(format, [&](auto fmt) {
    using Fmt = decltype(fmt);
    NaiveGemm<Fmt> gemm{operand, M, k, transposed, &outt};
    for (float& x : gemm.operand) x = Fmt::load(Fmt::store(x));
    v.expect_ok(schedule(core::NF4PanelGemm{&NaiveGemm<Fmt>::run, &gemm}));
  });
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < M; ++t) out[t * n + i] = outt[i * M + t];
  return out;
}

}  // namespace

// Inputs: w [n] float, blocksize. Outputs: packed, absmax (bit for bit).
void check_nf4_quantize(const Case& c, Verdict& v) {
  const Array& w = c.get("w");
  const int64_t n = w.numel(), bs = static_cast<int64_t>(c.scalar("blocksize"));
  std::vector<uint8_t> packed((n + 1) / 2);
  std::vector<float> absmax((n + bs - 1) / bs);
  v.expect_ok(core::nf4_quantize(w.bytes.data(), FloatTensors::float_format(w), n, bs, packed.data(),
                                 absmax.data()));
  v.compare(c, "packed", {packed.begin(), packed.end()});
  v.compare(c, "absmax", to_doubles(absmax));
}

// Inputs: packed, absmax, blocksize; the output's dtype and size are expected.w's. Output: w (bit for bit).
void check_nf4_dequantize(const Case& c, Verdict& v) {
  const Array& want = c.get("expected.w");
  Array got{"", want.dtype, want.shape, std::vector<uint8_t>(want.bytes.size())};
  v.expect_ok(core::nf4_dequantize(weights_of(c), want.numel(), FloatTensors::float_format(want), got.bytes.data()));
  v.compare(c, "w", got.values());
}

// Inputs: qabsmax [n] uint8, code [256], absmax2, offset, blocksize. Output: absmax (bit for bit).
void check_nf4_absmax_dequantize(const Case& c, Verdict& v) {
  const Array& q = c.get("qabsmax");
  std::vector<float> out(q.numel());
  v.expect_ok(core::nf4_absmax_dequantize(data_as<uint8_t>(q), q.numel(), data_as<float>(c.get("code")),
                                          data_as<float>(c.get("absmax2")), static_cast<float>(c.scalar("offset")),
                                          static_cast<int64_t>(c.scalar("blocksize")), out.data()));
  v.compare(c, "absmax", to_doubles(out));
}

// Inputs: x [M, in], grad_y [M, out], lora_x (optional: the LoRA branch's own input), packed, absmax, lora_A [r, in],
// lora_B [out, r], bias [out], blocksize, scaling, panel_bytes. Builds the augmented operands as the ATen face
// (csrc/nf4_inputs.h) and runs both schedules. Outputs: y.fused, y.panels [M, out]; dx.fused, dx.panels [M, in]
// (dx = grad_y·W, plus s·(grad_y·B)·A when there is no lora_x).
void check_nf4_linear(const Case& c, Verdict& v) {
  const Array &x = c.get("x"), &grad_y = c.get("grad_y"), &a = c.get("lora_A");
  const int64_t M = x.shape.at(0), in = x.shape.at(1), out = grad_y.shape.at(1), r = a.shape.at(0);
  const float s = static_cast<float>(c.scalar("scaling"));
  const int64_t panel_bytes = static_cast<int64_t>(c.scalar("panel_bytes"));
  const core::FloatFormat format = x.dtype == DType::bf16 ? core::FloatFormat::bf16 : core::FloatFormat::f32;
  const std::vector<float> xf = floats(x), gf = floats(grad_y), af = floats(a), bf = floats(c.get("lora_B"));
  const std::vector<float> bias = floats(c.get("bias"));
  const Array* lora_x = c.find("lora_x");
  const std::vector<float> lx = lora_x ? floats(*lora_x) : xf;
  // Forward: xa = [x | lora_x·Aᵀ | 1] [M, in + r + 1], e = [s·B | b] [out, r + 1].
  const int64_t ka = in + r + 1, ecols = r + 1;
  std::vector<float> xa(M * ka), e(out * ecols);
  for (int64_t t = 0; t < M; ++t) {
    std::copy(xf.begin() + t * in, xf.begin() + (t + 1) * in, xa.begin() + t * ka);
    for (int64_t j = 0; j < r; ++j) {
      double h = 0.0;
      for (int64_t k = 0; k < in; ++k) h += double{lx[t * in + k]} * af[j * in + k];
      xa[t * ka + in + j] = static_cast<float>(h);
    }
    xa[t * ka + in + r] = 1.0f;
  }
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t j = 0; j < r; ++j) e[o * ecols + j] = bf[o * r + j] * s;
    e[o * ecols + r] = bias[o];
  }
  const core::NF4Forward fwd{weights_of(c), in, out, e.data(), ecols};
  std::vector<float> y(M * out);
  v.expect_ok(core::nf4_forward_fused(fwd, xa.data(), M, y.data()));
  v.compare(c, "y.fused", to_doubles(y));
  y = run_panels(format, xa, M, ka, out, false, v, [&](const core::NF4PanelGemm& gemm) {
    return core::nf4_forward_panels(fwd, format, panel_bytes, gemm);
  });
  v.compare(c, "y.panels", to_doubles(y));
  // Backward: ga = [g | s·(g·B)] [M, out + r'] with r' = r, or r' = 0 when the LoRA branch has its own input.
  const int64_t rb = lora_x ? 0 : r, kb = out + rb;
  std::vector<float> ga(M * kb), gat(kb * M);
  for (int64_t t = 0; t < M; ++t) {
    std::copy(gf.begin() + t * out, gf.begin() + (t + 1) * out, ga.begin() + t * kb);
    for (int64_t j = 0; j < rb; ++j) {
      double gh = 0.0;
      for (int64_t o = 0; o < out; ++o) gh += double{gf[t * out + o]} * bf[o * r + j];
      ga[t * kb + out + j] = static_cast<float>(s * gh);
    }
  }
  for (int64_t t = 0; t < M; ++t)
    for (int64_t i = 0; i < kb; ++i) gat[i * M + t] = ga[t * kb + i];
  const core::NF4Backward bwd{weights_of(c), in, out, af.data(), rb};
  std::vector<float> dx(M * in);
  v.expect_ok(core::nf4_backward_fused(bwd, gat.data(), M, dx.data()));
  v.compare(c, "dx.fused", to_doubles(dx));
  dx = run_panels(format, ga, M, kb, in, true, v, [&](const core::NF4PanelGemm& gemm) {
    return core::nf4_backward_panels(bwd, format, panel_bytes, gemm);
  });
  v.compare(c, "dx.panels", to_doubles(dx));
}

}  // namespace slimrate::tests

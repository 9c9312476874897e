// The BackSlash rate kernels (docs/backslash.md §2) on a list of `count` contiguous float tensors given as raw
// pointers: tensor i holds numels[i] elements stored in formats[i]. The elements are cut into chunks of
// kRateChunk, run with parallel_for; per-chunk float64 partial sums are added in chunk order, so results do not
// depend on the thread count. Callers check the inputs (the faces do); these functions never throw.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/float_format.h"
#include "core/status.h"

namespace slimrate::core {

// 64 Ki elements per task: large enough to amortise scheduling, small enough to balance ~50 tensors of uneven
// sizes over the cores.
constexpr int64_t kRateChunk = int64_t{1} << 16;

// out = {N, Σ|x|, Σx²} over all elements of all tensors, in float64.
Status rate_stats(const void* const* tensors, const int64_t* numels, const FloatFormat* formats, size_t count,
                  double out[3]) noexcept;

// grads[i] += λ·(ν/N)·sign(θ)·(|θ|+ε)^(ν−1) element-wise over thetas[i], in place; *r = R = (1/N) Σ (|θ|+ε)^ν
// (0 when N = 0): the terms summed per block of 256 elements in the compute type, the blocks in float64.
// grads[i] has the numel and format of thetas[i] and may be the same memory. Requires ν > 0 and ε ≥ 0.
// float64 tensors compute in float64 with libm; the others in float32, with ν = ½, 1 and 2 exact (sqrt, products)
// and any other ν as 2^((ν−1)·log2(|θ|+ε)) from Pow2MathF32 (kernels/rate_terms.h). Runs the code of the ISA
// selected_cpu_isa() picks (core/arch.h); Status::bad_cpu_isa where SLIMRATE_CPU_ISA names none this CPU runs.
Status rate_grad(const void* const* thetas, void* const* grads, const int64_t* numels, const FloatFormat* formats,
                 size_t count, double lam, double nu, double eps, double* r) noexcept;

}  // namespace slimrate::core

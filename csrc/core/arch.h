// The one place that decides which SIMD code the CPU kernels compile. Kernels are portable loops written for the
// auto-vectoriser; on x86-64 one build carries clones of them for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the
// baseline, picked at load time (GCC/Clang target_clones, which needs ELF ifuncs). Elsewhere — aarch64 above all —
// the same loops compile once for the target, and GCC/Clang at -O3 turn them into NEON (Advanced SIMD, part of
// every ARMv8-A core).
//
// Building with -DSLIMRATE_SCALAR drops the clones and the x86 intrinsic paths on x86 too, so the portable code
// that ARM runs is tested on the development machine (tools/core_check.py --host builds the core both ways).
//
// A kernel whose speed matters per ISA can instead be compiled once per ISA by run_for_isa below and run on the
// ISA that selected_cpu_isa() picks: the best this CPU runs, or the one the environment variable
// SLIMRATE_CPU_ISA names (generic, avx2 or avx512), so a benchmark can time the AVX2 code on an AVX-512 machine.
// The rate kernel rate_grad (core/rate.cpp) is the one that does so.
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(SLIMRATE_SCALAR)
// 1 where x86 intrinsic paths (immintrin.h, AVX2/AVX-512 gathers and permutes) are compiled; code using them
// sits under `#if SLIMRATE_X86_SIMD` beside a portable fallback with results within the same tolerances.
#define SLIMRATE_X86_SIMD 1
// AVX-512, AVX2 and baseline x86-64 clones of a kernel loop.
#define SLIMRATE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// AVX-512 and baseline only, for loops that vectorise only with AVX-512 instructions (vplzcntq for the
// exp-Golomb code lengths): an AVX2 clone would be the baseline code again.
#define SLIMRATE_CPU_CLONES_V4 __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define SLIMRATE_X86_SIMD 0
#define SLIMRATE_CPU_CLONES
#define SLIMRATE_CPU_CLONES_V4
#endif

namespace slimrate::core {

// The instruction sets run_for_isa compiles for: baseline x86-64 (or the build's target elsewhere), x86-64-v3
// (AVX2, FMA) and x86-64-v4 (AVX-512).
enum class CpuIsa : int { generic, avx2, avx512 };

// Sets *isa to the ISA that SLIMRATE_CPU_ISA names, or when it is unset or empty to the best this CPU runs;
// false (and *isa unchanged) where it names none of generic, avx2, avx512, or one this CPU lacks. The variable is
// read at every call (a getenv, cheap beside a kernel), so a process can time one ISA after another.
inline bool selected_cpu_isa(CpuIsa* isa) {
#if SLIMRATE_X86_SIMD
  static const int best = __builtin_cpu_supports("x86-64-v4")   ? int(CpuIsa::avx512)
                          : __builtin_cpu_supports("x86-64-v3") ? int(CpuIsa::avx2)
                                                                : int(CpuIsa::generic);
#else
  constexpr int best = int(CpuIsa::generic);
#endif
  const char* name = std::getenv("SLIMRATE_CPU_ISA");
  if (name == nullptr || *name == '\0') {
    *isa = static_cast<CpuIsa>(best);
    return true;
  }
  constexpr const char* kNames[] = {"generic", "avx2", "avx512"};
  for (int i = 0; i <= best; ++i) {
    if (std::strcmp(name, kNames[i]) == 0) {
      *isa = static_cast<CpuIsa>(i);
      return true;
    }
  }
  return false;
}

// f() with f and all it calls inlined (flatten) into a function compiled for one ISA, so the auto-vectoriser
// writes f's loops for that ISA. Unlike SLIMRATE_CPU_CLONES the caller picks the ISA (selected_cpu_isa).
template <class F>
__attribute__((flatten)) auto run_generic(const F& f) {
  return f();
}
#if SLIMRATE_X86_SIMD
template <class F>
__attribute__((target("arch=x86-64-v3"), flatten)) auto run_avx2(const F& f) {
  return f();
}
template <class F>
__attribute__((target("arch=x86-64-v4"), flatten)) auto run_avx512(const F& f) {
  return f();
}
#endif

template <class F>
auto run_for_isa(CpuIsa isa, const F& f) {
#if SLIMRATE_X86_SIMD
  if (isa == CpuIsa::avx512) return run_avx512(f);
  if (isa == CpuIsa::avx2) return run_avx2(f);
#endif
  return run_generic(f);
}

}  // namespace slimrate::core

// The one place that decides which SIMD code the CPU kernels compile. Kernels are portable loops written for the
// auto-vectoriser; on x86-64 one build carries clones of them for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the
// baseline, picked at load time (GCC/Clang target_clones, which needs ELF ifuncs). Elsewhere — aarch64 above all —
// the same loops compile once for the target, and GCC/Clang at -O3 turn them into NEON (Advanced SIMD, part of
// every ARMv8-A core).
//
// Building with -DSLIMRATE_SCALAR drops the clones and the x86 intrinsic paths on x86 too, so the portable code
// that ARM runs is tested on the development machine (tools/core_check.py --host builds the core both ways).
#pragma once

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

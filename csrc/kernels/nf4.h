// Torch-free NF4 helpers shared by the CPU and CUDA kernels (docs/qlora.md §2–§3): the code table, the
// quantizer's index rule and the layout of bitsandbytes' packed 4-bit weights.
//
// Layout: W [out, in] flattened row-major into n = out·in weights; weight i lies in byte i/2, the high nibble
// when i is even; its scale is absmax[i / blocksize] (blocks run across row ends when in % blocksize != 0);
// its value is kNF4Code[nibble]·absmax computed in float32.
#pragma once
#include <cstdint>

#include "kernels/portable.h"

namespace slimrate {

// bitsandbytes.functional.get_4bit_type("nf4"), as float32 (create_normal_map, offset 0.9677083).
#define SLIMRATE_NF4_CODE                                                                               \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,     \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,      \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,               \
   0.7229568362236023f, 1.0f}

constexpr float kNF4Code[16] = SLIMRATE_NF4_CODE;

// Index of the nibble that pads an odd weight count: code 7 is 0.0 (bitsandbytes pads the scaled values with 0).
constexpr uint8_t kNF4PadIndex = 7;

// The 15 midpoints (code[i] + code[i+1]) / 2 in float32, as bitsandbytes' quantize_4bit computes them.
SLIMRATE_HD float nf4_midpoint(int i) {
  constexpr float code[16] = SLIMRATE_NF4_CODE;
  return (code[i] + code[i + 1]) / 2.0f;
}

// Code index of a scaled weight v ∈ [-1, 1]: the number of midpoints strictly below v, so a value exactly on
// a midpoint takes the lower code (torch.bucketize(v, midpoints), right=False, in bitsandbytes). Branch-free.
SLIMRATE_HD uint32_t nf4_index(float v) {
  uint32_t idx = 0;
  for (int i = 0; i < 15; ++i) idx += static_cast<uint32_t>(v > nf4_midpoint(i));
  return idx;
}

// torch.clamp(v, -1, 1).
SLIMRATE_HD float nf4_clamp(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Nibble of weight i in the packed bytes.
SLIMRATE_HD uint32_t nf4_nibble(const uint8_t* packed, int64_t i) {
  uint32_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 15u) : (byte >> 4);
}

// The quantizer's divisor floor: bitsandbytes clamps absmax to >= 1e-38 before dividing (an all-zero block
// scales to 0 and gets code 7).
constexpr float kNF4AbsmaxFloor = 1e-38f;

}  // namespace slimrate

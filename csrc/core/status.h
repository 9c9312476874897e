// What a core function returns instead of throwing: its faces turn a status other than ok into their own error
// (the PyTorch extension raises through TORCH_CHECK).
#pragma once

namespace slimrate::core {

enum class Status : int {
  ok = 0,
  out_of_memory,    // a work buffer could not be allocated
  bad_index,        // an index input points outside the array it indexes (the function says which input)
  callback_failed,  // a function the caller passed in (e.g. a GEMM) reported a failure
  bad_value,        // an input value cannot be coded (the function's error text names it)
  corrupt_stream,   // a coded input is truncated, padded or corrupt (the function's error text says where)
  bad_cpu_isa,      // SLIMRATE_CPU_ISA names no instruction set this CPU runs (core/arch.h)
};

inline const char* describe(Status status) {
  switch (status) {
    case Status::ok: return "ok";
    case Status::out_of_memory: return "out of memory for the kernel's work buffers";
    case Status::bad_index: return "an index is out of range";
    case Status::callback_failed: return "a function passed to the kernel failed";
    case Status::bad_value: return "an input value cannot be coded";
    case Status::corrupt_stream: return "a coded input is truncated or corrupt";
    case Status::bad_cpu_isa:
      return "SLIMRATE_CPU_ISA names no instruction set this CPU runs: set generic, avx2 or avx512 (one the CPU "
             "has), or unset it to pick the best";
  }
  return "unknown status";
}

}  // namespace slimrate::core

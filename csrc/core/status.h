// What a core function returns instead of throwing: its faces turn a status other than ok into their own error
// (the PyTorch extension raises through TORCH_CHECK).
#pragma once

namespace slimrate::core {

enum class Status : int {
  ok = 0,
  out_of_memory,  // a work buffer could not be allocated
};

inline const char* describe(Status status) {
  switch (status) {
    case Status::ok: return "ok";
    case Status::out_of_memory: return "out of memory for the kernel's work buffers";
  }
  return "unknown status";
}

}  // namespace slimrate::core

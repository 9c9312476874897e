// What every ATen face of the torch-free core (csrc/core/) does around a core call: hand the core torch's thread
// count, and raise on a status other than ok.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <string>

#include "core/status.h"

namespace slimrate {

// core::parallel_for sizes its team with omp_get_max_threads(), a per-thread OpenMP setting: this makes it the
// intra-op thread count at::parallel_for would use here (torch.set_num_threads, also in threads other than the
// one that set it, and also if the extension were linked to another OpenMP runtime than torch's).
inline void use_torch_threads() {
#ifdef _OPENMP
  omp_set_num_threads(at::get_num_threads());
#endif
}

inline void check_core(core::Status status) {
  TORCH_CHECK(status == core::Status::ok, "slimrate CPU kernel: ", core::describe(status));
}

// check_core for a function that explains the inputs it refuses (bad_value, corrupt_stream) in `error`: those
// are the user's data, so Python sees a ValueError with that text.
inline void check_core(core::Status status, const std::string& error) {
  TORCH_CHECK_VALUE(status != core::Status::bad_value && status != core::Status::corrupt_stream, error);
  check_core(status);
}

}  // namespace slimrate

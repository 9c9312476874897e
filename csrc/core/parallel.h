// parallel_for of the torch-free core: OpenMP with the split of at::parallel_for's OpenMP backend, so a kernel
// runs the same way under the PyTorch extension and without ATen. Serial inside a parallel region, with one
// thread, or when [begin, end) fits one grain; otherwise min(threads, ⌈range/grain⌉) threads each run one
// contiguous chunk of ⌈range/threads⌉ iterations. Serial when compiled without OpenMP.
//
// The thread count is OpenMP's omp_get_max_threads() in the calling thread; the ATen faces set it to torch's
// (torch.set_num_threads) before calling the core (csrc/cpu/core_face.h). f(lo, hi) must not throw.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <new>

#include "core/status.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace slimrate::core {

// The threads parallel_for splits a large range over when called outside a parallel region.
inline int64_t max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
#ifdef _OPENMP
  const int64_t range = end - begin;
  if (range > grain && range > 1 && !omp_in_parallel() && omp_get_max_threads() > 1) {
    // The team takes the default size and idle members return at once, as in ATen: a num_threads clause hits
    // a bug in GOMP's thread pool (pytorch/pytorch#32008).
#pragma omp parallel
    {
      int64_t threads = omp_get_num_threads();
      if (grain > 0) threads = std::min(threads, (range + grain - 1) / grain);
      const int64_t chunk = (range + threads - 1) / threads;
      const int64_t lo = begin + omp_get_thread_num() * chunk;
      if (lo < end) f(lo, std::min(end, lo + chunk));
    }
    return;
  }
#endif
  f(begin, end);
}

// parallel_for for bodies that allocate work buffers: Status::out_of_memory if a chunk ran out of memory (that
// chunk stopped there, the others ran to their end), else ok.
template <class F>
Status try_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  std::atomic<bool> failed{false};
  parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) {
    try {
      f(lo, hi);
    } catch (const std::bad_alloc&) {
      failed = true;
    }
  });
  return failed ? Status::out_of_memory : Status::ok;
}

}  // namespace slimrate::core

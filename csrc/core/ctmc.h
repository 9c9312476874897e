// The CTMC kernels of DMB's structured rate matrix (docs/dmb.md §3–§4; closed forms in csrc/kernels/ctmc.h) on raw
// pointers, for T = float or double. Callers check the inputs (the faces do: token ids in [0, V), perm and
// perm_inv inverse permutations, lam a valid Λ, times and rates finite and ≥ 0); these functions never throw.
//
// Rows are the B·L flat positions i = b·L + l, run with parallel_for, each vectorised over its V states. Results do
// not depend on the thread count.
#pragma once
#include <cstdint>

#include "core/status.h"

namespace slimrate::core {

// The rate matrix at each of L positions over V states, [L, V] each, contiguous.
template <class T>
struct CtmcStructure {
  const T* lam;             // Λ in rank order: non-decreasing, lam[l, V-1] = 0
  const int64_t* perm;      // rank of each state
  const int64_t* perm_inv;  // state at each rank
  int64_t L, V;
};

// out [B, L, V] = p(y | x0[b, l]) after time h[b]: x0 [B, L] token ids, h [B].
template <class T>
Status ctmc_transition_rows(const CtmcStructure<T>& s, const int64_t* x0, const T* h, int64_t B, T* out) noexcept;

// The backward of ctmc_transition_rows for its output gradient grad [B, L, V]: dlam [L, V] and dh [B] (each dh[b]
// summed over l in float64, rounded once).
template <class T>
Status ctmc_transition_rows_backward(const CtmcStructure<T>& s, const T* grad, const int64_t* x0, const T* h,
                                     int64_t B, T* dlam, T* dh) noexcept;

// out [B, L, V] = Q[y, x[b, l]], the rates into x: x [B, L] token ids.
template <class T>
Status ctmc_rate_cols(const CtmcStructure<T>& s, const int64_t* x, int64_t B, T* out) noexcept;

// The score entropy of logscore [B, L, V] for x_t, x0 [B, L], h, sigma [B] (docs/dmb.md §4): loss [B] (each summed
// over l in float64, rounded once) and, when grad is not null, d loss[b] / d logscore [B, L, V]. *unreachable is the
// first flat row b·L + l whose x_t cannot be reached from x0 (p(x_t | x0) = 0 with a nonzero weight: the row adds 0),
// or −1.
template <class T>
Status score_entropy(const CtmcStructure<T>& s, const T* logscore, const int64_t* x_t, const int64_t* x0, const T* h,
                     const T* sigma, int64_t B, T* loss, T* grad, int64_t* unreachable) noexcept;

}  // namespace slimrate::core

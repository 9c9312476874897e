// Torch-free CUDA launchers of the CTMC ops (schemas in csrc/ops.cpp, ATen glue in ctmc_cuda_glue.cpp,
// closed forms in csrc/kernels/ctmc.h).  All tensors are contiguous device arrays checked by the glue:
// token ids in [0, V), perm / perm_inv inverse permutations, lam a valid Λ, h and sigma ≥ 0.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace slimrate {

// DMB's structured Q for L positions of V states: lam [L, V] (Λ in rank order), perm [L, V] (rank of each state),
// perm_inv [L, V] (state at each rank); `T` is float or double.
template <class T>
struct CtmcDeviceArgs {
  const T* lam;
  const int64_t* perm;
  const int64_t* perm_inv;
  int64_t B, L, V;
};

// out [B, L, V] = p(y | x0[b, l]) after time h[b].
template <class T>
cudaError_t ctmc_transition_rows_cuda_launch(const CtmcDeviceArgs<T>& a, const int64_t* x0, const T* h, T* out,
                                             cudaStream_t stream);

// dlam [L, V] (zeroed by the caller) and dh_part [B, L] (Σ over positions gives dh) from grad [B, L, V].
template <class T>
cudaError_t ctmc_transition_rows_backward_cuda_launch(const CtmcDeviceArgs<T>& a, const T* grad, const int64_t* x0,
                                                      const T* h, T* dlam, T* dh_part, cudaStream_t stream);

// out [B, L, V] = Q[y, x[b, l]].
template <class T>
cudaError_t ctmc_rate_cols_cuda_launch(const CtmcDeviceArgs<T>& a, const int64_t* x, T* out, cudaStream_t stream);

// loss_row [B, L] (Σ over positions gives the loss) and, when grad != nullptr, d loss[b] / d logscore [B, L, V].
// Rows whose x_t is unreachable from x0 give 0 (the glue rejects them before the launch).
template <class T>
cudaError_t score_entropy_cuda_launch(const CtmcDeviceArgs<T>& a, const T* logscore, const int64_t* x_t,
                                      const int64_t* x0, const T* h, const T* sigma, T* loss_row, T* grad,
                                      cudaStream_t stream);

}  // namespace slimrate

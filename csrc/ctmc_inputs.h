// Checked inputs of the CTMC ops (schemas in csrc/ops.cpp): the ATen glue shared by csrc/cpu and csrc/cuda.
// Shapes, dtypes and devices are checked first (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE: ValueError / TypeError in
// Python); then the data: token ids in [0, V), perm and perm_inv inverse permutations, lam a valid Λ
// (finite, non-decreasing, last entry 0: rates a_i = Λ_{i+1} − Λ_i ≥ 0), times h and rates sigma finite and
// ≥ 0.  The native backend relies on these (python/slimrate/ops/ctmc.py checks only the metadata first), so a
// direct torch.ops.slimrate call never reads out of bounds and never returns garbage silently.
// On the CPU each data check is one pass over the small index/parameter tensors; on other devices they are
// torch reductions with one device→host copy for all of them.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

namespace slimrate {

struct CtmcStructure {
  at::Tensor lam;       // [L, V] float32/float64, contiguous: Λ in rank order
  at::Tensor perm;      // [L, V] int64, contiguous: rank of each state
  at::Tensor perm_inv;  // [L, V] int64, contiguous: state at each rank
  int64_t L = 0, V = 0;
};

inline void check_ctmc_device(const at::Tensor& t, const char* what, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, what, ": expected a tensor on ", device, " like lam, got ", t.device());
}

inline void check_ctmc_index(const at::Tensor& t, const char* what, at::IntArrayRef shape, const at::Device& device) {
  check_ctmc_device(t, what, device);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, what, ": expected int64 token ids, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, what, ": expected shape ", shape, ", got ", t.sizes());
}

inline void check_ctmc_float(const at::Tensor& t, const char* what, at::IntArrayRef shape, const at::Tensor& lam) {
  check_ctmc_device(t, what, lam.device());
  TORCH_CHECK_TYPE(t.scalar_type() == lam.scalar_type(), what, ": expected ", lam.scalar_type(), " like lam, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, what, ": expected shape ", shape, ", got ", t.sizes());
}

// lam [L, V] float32/float64 on `device`, perm and perm_inv [L, V] int64: metadata checks, contiguous copies,
// then the data checks.
inline CtmcStructure ctmc_structure(const at::Tensor& lam, const at::Tensor& perm, const at::Tensor& perm_inv,
                                    const at::Device& device) {
  check_ctmc_device(lam, "lam", device);
  TORCH_CHECK_TYPE(lam.scalar_type() == at::kFloat || lam.scalar_type() == at::kDouble,
                   "lam: expected float32 or float64, got ", lam.scalar_type());
  TORCH_CHECK_VALUE(lam.dim() == 2 && lam.size(1) > 0, "lam: expected a [L, V] tensor with V > 0, got shape ",
                    lam.sizes());
  CtmcStructure s;
  s.L = lam.size(0);
  s.V = lam.size(1);
  check_ctmc_index(perm, "perm", lam.sizes(), device);
  check_ctmc_index(perm_inv, "perm_inv", lam.sizes(), device);
  s.lam = lam.contiguous();
  s.perm = perm.contiguous();
  s.perm_inv = perm_inv.contiguous();
  return s;
}

// ---- data checks on the CPU: one pass each, the first bad entry named ----

// Branch-free passes (they run on every call); the first bad entry is searched for only on failure.
inline void check_structure_cpu(const CtmcStructure& s) {
  const int64_t L = s.L, V = s.V;
  const int64_t* perm = s.perm.const_data_ptr<int64_t>();
  const int64_t* inv = s.perm_inv.const_data_ptr<int64_t>();
  int64_t bad = 0;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t k = 0; k < V; ++k) {
      // perm[perm_inv[k]] = k for every k makes perm_inv injective, so both are permutations of [0, V).
      const int64_t y = inv[l * V + k];
      const int64_t out = static_cast<int64_t>(static_cast<uint64_t>(y) >= static_cast<uint64_t>(V));
      bad |= out | static_cast<int64_t>(perm[l * V + (out ? 0 : y)] != k);
    }
  }
  for (int64_t l = 0; bad != 0 && l < L; ++l) {
    for (int64_t k = 0; k < V; ++k) {
      const int64_t y = inv[l * V + k];
      TORCH_CHECK_VALUE(y >= 0 && y < V, "perm_inv: entry [", l, ", ", k, "] = ", y, " is not a state in [0, ", V,
                        "); perm_inv[l] must be the inverse permutation of perm[l]");
      TORCH_CHECK_VALUE(perm[l * V + y] == k, "perm: perm[", l, ", perm_inv[", l, ", ", k, "]] = ", perm[l * V + y],
                        ", expected ", k, "; perm[l] and perm_inv[l] must be inverse permutations of [0, ", V, ")");
    }
  }
  AT_DISPATCH_FLOATING_TYPES(s.lam.scalar_type(), "ctmc lam check", [&] {
    const scalar_t* lam = s.lam.const_data_ptr<scalar_t>();
    int64_t bad_lam = 0;
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t* row = lam + l * V;
      // !(a <= b) also catches NaN; a finite last entry 0 and a non-decreasing row bound every entry.
      for (int64_t j = 0; j + 1 < V; ++j) {
        bad_lam |= static_cast<int64_t>(!(row[j] <= row[j + 1]) || !std::isfinite(row[j]));
      }
      bad_lam |= static_cast<int64_t>(row[V - 1] != 0);
    }
    for (int64_t l = 0; bad_lam != 0 && l < L; ++l) {
      const scalar_t* row = lam + l * V;
      for (int64_t j = 0; j + 1 < V; ++j) {
        TORCH_CHECK_VALUE(std::isfinite(row[j]) && row[j] <= row[j + 1], "lam: row ", l, " is not a valid Λ: lam[",
                          l, ", ", j, "] = ", row[j], " > lam[", l, ", ", j + 1, "] = ", row[j + 1],
                          " means a negative rate a_", j, " (or a non-finite entry); build lam as "
                          "Λ_k = −Σ_{i≥k} a_i from rates a_i ≥ 0");
      }
      TORCH_CHECK_VALUE(row[V - 1] == 0, "lam: expected lam[", l, ", V-1] = 0 (the absorbing last rank), got ",
                        row[V - 1]);
    }
  });
}

inline void check_tokens_cpu(const at::Tensor& x, const char* what, int64_t V) {
  const int64_t* p = x.const_data_ptr<int64_t>();
  const int64_t n = x.numel();
  int64_t bad = 0;  // branch-free, so the pass vectorises; the entry is found only on failure
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<int64_t>(static_cast<uint64_t>(p[i]) >= static_cast<uint64_t>(V));
  if (bad == 0) return;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < V, what, ": token id ", p[i], " at flat index ", i, " is not in [0, V = ",
                      V, ")");
  }
}

inline void check_times_cpu(const at::Tensor& t, const char* what) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "ctmc time check", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(p[i]) && p[i] >= 0, what, ": expected finite values >= 0, got ", p[i],
                        " at index ", i);
    }
  });
}

// ---- the same data checks off the CPU: torch reductions, one synchronisation ----

struct DeviceCheck {
  std::vector<at::Tensor> flags;
  std::vector<std::string> messages;
  void add(at::Tensor bad, std::string message) {
    flags.push_back(bad.reshape({}).to(at::kBool));
    messages.push_back(std::move(message));
  }
  void add_structure(const CtmcStructure& s) {
    if (s.L == 0) return;
    at::Tensor inv = s.perm_inv;
    add(inv.lt(0).logical_or(inv.ge(s.V)).any(), "perm_inv: an entry is not a state in [0, V)");
    at::Tensor ranks = at::arange(s.V, inv.options()).expand({s.L, s.V});
    add(s.perm.gather(1, inv.clamp(0, s.V - 1)).ne(ranks).any(),
        "perm: perm[l, perm_inv[l, k]] != k somewhere; perm[l] and perm_inv[l] must be inverse permutations");
    add(s.lam.isfinite().logical_not().any(), "lam: an entry is not finite");
    if (s.V > 1) {
      add(s.lam.narrow(1, 1, s.V - 1).lt(s.lam.narrow(1, 0, s.V - 1)).any(),
          "lam: a row decreases (a negative rate a_i = lam[l, i+1] - lam[l, i]); build lam as Λ_k = −Σ_{i≥k} a_i "
          "from rates a_i ≥ 0");
    }
    add(s.lam.select(1, s.V - 1).ne(0).any(), "lam: expected lam[:, V-1] = 0 (the absorbing last rank)");
  }
  void add_tokens(const at::Tensor& x, const char* what, int64_t V) {
    if (x.numel() == 0) return;
    add(x.lt(0).logical_or(x.ge(V)).any(),
        std::string(what) + ": a token id is not in [0, V = " + std::to_string(V) + ")");
  }
  void add_times(const at::Tensor& t, const char* what) {
    if (t.numel() == 0) return;
    add(t.isfinite().logical_not().logical_or(t.lt(0)).any(), std::string(what) + ": expected finite values >= 0");
  }
  void run() {
    if (flags.empty()) return;
    at::Tensor host = at::stack(flags).cpu();
    const bool* f = host.const_data_ptr<bool>();
    for (size_t i = 0; i < messages.size(); ++i) TORCH_CHECK_VALUE(!f[i], messages[i]);
  }
};

}  // namespace slimrate

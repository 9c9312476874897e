"""Dense matrix exponentials for general rate matrices: ``expm`` (batched scaling and squaring with Padé
approximants, Higham 2005) and ``expm_multi_t`` (exp(t·Q) at many times from one set of Taylor powers of Q).

Plain PyTorch (csrc/ops.cpp names them): the work is matrix products, and torch's GEMMs are the kernels, on
every device.  Both are differentiable in Q through those products.  Backends: "native" is the algorithm here
(``expm_pade``, ``expm_multi_t_taylor``), "reference" torch.linalg.matrix_exp; there is no Triton backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from slimrate.ops.backend import pick_backend
from slimrate.ops.checks import check_tensor

EXPM_DTYPES = (torch.float32, torch.float64)

# Higham 2005 ("The scaling and squaring method for the matrix exponential revisited", SIAM J. Matrix Anal.
# Appl. 26(4), Table 2.3 and §3): the largest 1-norm θ_m for which the [m/m] Padé approximant of exp has
# backward error ≤ u; float64 uses m ≤ 13, float32 (u = 2^-24) m ≤ 7.
PADE_THETA = {
    torch.float64: {3: 1.495585217958292e-2, 5: 2.539398330063230e-1, 7: 9.504178996162932e-1,
                    9: 2.097847961257068e0, 13: 5.371920351148152e0},
    torch.float32: {3: 4.258730016922831e-1, 5: 1.880152677804762e0, 7: 3.925724783138660e0},
}

# Al-Mohy & Higham 2011 ("Computing the action of the matrix exponential", SIAM J. Sci. Comput. 33(2),
# Table 3.1): the largest θ_m with backward error ≤ u for the degree-m Taylor polynomial T_m applied to a
# matrix of norm (bound) θ_m.  Recomputed with mpmath as the largest θ with Σ_{k>m} |c_k| θ^{k−1} ≤ u, c_k the
# series of log(e^{−x}·T_m(x)) (tests/test_ctmc.py re-derives two entries).
TAYLOR_THETA = {
    torch.float64: {5: 2.40088e-3, 10: 1.44183e-1, 15: 6.41084e-1, 20: 1.43825, 25: 2.42858, 30: 3.53967,
                    35: 4.72835, 40: 5.96880, 45: 7.24507, 50: 8.54690, 55: 9.86750},
    torch.float32: {5: 1.30849e-1, 10: 9.95184e-1, 15: 2.21704, 20: 3.55093, 25: 4.92690, 30: 6.32108,
                    35: 7.72380, 40: 9.13065, 45: 10.5394, 50: 11.9490, 55: 13.3588},
}


def _pade_coefficients(m: int) -> list[float]:
    """c_k = (2m−k)!·m! / ((2m)!·k!·(m−k)!), k = 0..m: the numerator of the [m/m] Padé approximant of e^x."""
    f = math.factorial
    return [f(2 * m - k) * f(m) / (f(2 * m) * f(k) * f(m - k)) for k in range(m + 1)]


def _check_square(name: str, q) -> None:
    check_tensor(name, q, dtypes=EXPM_DTYPES)
    if q.dim() < 2 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"{name}: expected square matrices [..., n, n], got shape {tuple(q.shape)}")


def check_finite(Q: torch.Tensor, *_other_args) -> None:
    """Q's entries are finite: the native algorithms' data check, made before the reference (the other
    arguments, expm_multi_t's ts, are checked by its face).  One synchronisation."""
    if not bool(torch.isfinite(Q.detach()).all()):
        raise ValueError("Q: expected finite entries, got inf or nan")


def _pade(a: torch.Tensor, m: int) -> torch.Tensor:
    """r_m(a) = (V − U)⁻¹(V + U), the [m/m] Padé approximant of exp, for a batch a [N, n, n] (Higham 2005 §2)."""
    c = _pade_coefficients(m)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    a2 = a @ a
    if m == 13:  # U, V with A², A⁴, A⁶ only: 6 products (Higham 2005, eq. 2.3)
        a4 = a2 @ a2
        a6 = a4 @ a2
        u = a @ (a6 @ (c[13] * a6 + c[11] * a4 + c[9] * a2) + c[7] * a6 + c[5] * a4 + c[3] * a2 + c[1] * eye)
        v = a6 @ (c[12] * a6 + c[10] * a4 + c[8] * a2) + c[6] * a6 + c[4] * a4 + c[2] * a2 + c[0] * eye
    else:
        powers = [eye, a2]
        for _ in range(2, m // 2 + 1):
            powers.append(powers[-1] @ a2)
        u = a @ sum(c[2 * k + 1] * powers[k] for k in range(m // 2 + 1))
        v = sum(c[2 * k] * powers[k] for k in range(m // 2 + 1))
    return torch.linalg.solve(v - u, v + u)


def expm(Q: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """exp(Q) for a batch of square matrices Q [..., n, n] float32/float64, same shape and dtype.

    Higham 2005's scaling and squaring: per matrix, the smallest Padé degree m ∈ {3, 5, 7, 9, 13} (float32:
    {3, 5, 7}) whose θ_m bounds ‖Q‖₁, else Q/2^s with s = ⌈log2(‖Q‖₁/θ_max)⌉ and s squarings; matrices that
    share (m, s) are computed together.  Backward error ≤ u (unit roundoff) per Padé step in exact arithmetic.
    backend="reference" runs torch.linalg.matrix_exp.
    """
    _check_square("Q", Q)
    return pick_backend("expm", backend, Q.device)(Q)


def expm_pade(Q: torch.Tensor) -> torch.Tensor:
    """expm's native backend: Higham 2005's scaling and squaring (see expm), Q [..., n, n] checked."""
    n = Q.shape[-1]
    a = Q.reshape(-1, n, n)
    if a.shape[0] == 0 or n == 0:
        return Q.clone()
    thetas = PADE_THETA[Q.dtype]
    m_max = max(thetas)
    norms = a.detach().abs().sum(-2).amax(-1).tolist()  # 1-norms
    plan = []  # (m, s) per matrix
    for norm in norms:
        if not math.isfinite(norm):
            raise ValueError(f"Q: expected finite entries, got a matrix of 1-norm {norm}")
        m = next((m for m in sorted(thetas) if norm <= thetas[m]), None)
        plan.append((m, 0) if m is not None else (m_max, max(0, math.ceil(math.log2(norm / thetas[m_max])))))
    pieces = []
    for m, s in sorted(set(plan)):
        idx = torch.tensor([i for i, p in enumerate(plan) if p == (m, s)], device=Q.device)
        x = _pade(a.index_select(0, idx) / 2.0**s, m)
        for _ in range(s):
            x = x @ x
        pieces.append((idx, x))
    out = torch.empty_like(a)
    for idx, x in pieces:
        out = out.index_copy(0, idx, x)  # out of place, so autograd sees every piece
    return out.reshape(Q.shape)


def _plan_taylor(alpha: float, tmax: dict[int, float], counts, dtype: torch.dtype, n: int, T: int) -> int:
    """The Taylor degree m with the fewest n×n products: m − 1 powers, plus per sign of t a chain of
    ⌈α·max|t|/θ_m⌉ − 1 steps and one product per time past the first step, plus the combination (≈ (m+1)·T/2n)."""
    best, best_cost = None, math.inf
    for m, theta in TAYLOR_THETA[dtype].items():
        tau = theta / alpha if alpha > 0 else math.inf
        cost = m - 1 + (m + 1) * T / (2 * max(n, 1))
        for sign, top in tmax.items():
            steps = math.floor(top / tau) if tau < math.inf else 0
            cost += max(steps - 1, 0) + counts(sign, tau)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def expm_multi_t(Q: torch.Tensor, ts: torch.Tensor | Sequence[float], *, backend: str | None = None) -> torch.Tensor:
    """exp(t·Q) for every t in ts: Q [n, n] float32/float64, ts [T] real (any sign, any order) -> [T, n, n].

    One set of Taylor powers of Q serves all times (Al-Mohy & Higham 2011, §3): with μ = trace(Q)/n and
    A = Q − μI, times are cut into steps of τ = θ_m/α (α = min(‖A‖₁, max(‖A²‖₁^½, ‖A³‖₁^⅓),
    max(‖A³‖₁^⅓, ‖A⁴‖₁^¼)), their Theorem 4.2 bound), and
        exp(tQ) = [e^{μr}·T_m(rA)] · [e^{μτ}·T_m(τA)]^q,   t = qτ + r, 0 ≤ r < τ  (per sign of t),
    where T_m(rA) = Σ_k (r^k/k!)·A^k is one linear combination of the shared powers A^0..A^m for all times at
    once, and the q-th power comes from a chain of products over the sorted times.  The degree m ≤ 55 minimises
    the number of n×n products.  Accuracy: each factor has backward error ≤ u (unit roundoff) in exact
    arithmetic, so exp(tQ) has backward error ≤ (q+1)·u·‖τA‖ ≈ u·α|t|, the bound of scaling and squaring;
    folding e^{μτ} into each factor keeps rate-matrix products bounded (no overflow for large |μt|).  Memory:
    m + 1 ≤ 56 matrices of n×n.  backend="reference" runs torch.linalg.matrix_exp on ts·Q.
    """
    _check_square("Q", Q)
    if Q.dim() != 2:
        raise ValueError(f"Q: expected one [n, n] matrix, got shape {tuple(Q.shape)}; use expm for batches")
    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
    if ts.dim() != 1:
        raise ValueError(f"ts: expected a 1-D sequence of times, got shape {tuple(ts.shape)}")
    if not torch.isfinite(ts).all():
        raise ValueError("ts: expected finite times")
    return pick_backend("expm_multi_t", backend, Q.device)(Q, ts)


def expm_multi_t_taylor(Q: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """expm_multi_t's native backend (see expm_multi_t): Q [n, n] checked, ts [T] float64 on the CPU."""
    n, T = Q.shape[0], ts.shape[0]
    if T == 0 or n == 0:
        return Q.new_empty((T, n, n))
    check_finite(Q)
    eye = torch.eye(n, dtype=Q.dtype, device=Q.device)
    mu = float(torch.trace(Q.detach())) / n
    a = Q - mu * eye
    powers = [eye, a]
    for _ in range(3):
        powers.append(powers[-1] @ a)
    norms = [float(p.detach().abs().sum(0).max()) for p in powers]  # ‖A^k‖₁, k = 0..4
    d = [norms[k] ** (1.0 / k) for k in (1, 2, 3, 4)]
    alpha = min(d[0], max(d[1], d[2]), max(d[2], d[3]))

    times = ts.tolist()
    groups = {sign: [i for i, t in enumerate(times) if (t < 0) == (sign < 0)] for sign in (1, -1)}
    groups = {sign: idx for sign, idx in groups.items() if idx}
    tmax = {sign: max(abs(times[i]) for i in idx) for sign, idx in groups.items()}

    def past_first_step(sign: int, tau: float) -> int:
        return sum(1 for i in groups[sign] if abs(times[i]) >= tau)

    m = _plan_taylor(alpha, tmax, past_first_step, Q.dtype, n, T)
    tau = TAYLOR_THETA[Q.dtype][m] / alpha if alpha > 0 else math.inf
    while len(powers) <= m:
        powers.append(powers[-1] @ a)
    stacked = torch.stack(powers).reshape(m + 1, n * n)
    inv_fact = [1.0 / math.factorial(k) for k in range(m + 1)]

    def combination(rs: list[float]) -> torch.Tensor:
        """[e^{μr}·T_m(rA) for r in rs] as [len(rs), n, n]: one product with the stacked powers."""
        coef = torch.tensor([[math.exp(mu * r) * r**k * inv_fact[k] for k in range(m + 1)] for r in rs],
                            dtype=Q.dtype, device=Q.device)
        return (coef @ stacked).reshape(len(rs), n, n)

    out = [None] * T
    for sign, idx in groups.items():
        steps = [math.floor(abs(times[i]) / tau) if tau < math.inf else 0 for i in idx]
        rests = [sign * (abs(times[i]) - q * tau) for i, q in zip(idx, steps, strict=True)]
        near = combination(rests)
        chain = [None]  # chain[q] = [e^{μτ}·T_m(τA)]^q over the sorted steps
        if max(steps) > 0:
            chain.append(combination([sign * tau])[0])
            while len(chain) <= max(steps):
                chain.append(chain[-1] @ chain[1])
        far = [j for j, q in enumerate(steps) if q > 0]
        for j in range(len(idx)):
            out[idx[j]] = near[j]
        if far:  # one batched product for every time past the first step
            prods = torch.bmm(near[far], torch.stack([chain[steps[j]] for j in far]))
            for j, x in zip(far, prods, strict=True):
                out[idx[j]] = x
    return torch.stack(out)

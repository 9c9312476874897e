"""The CTMC ops of the Discrete Markov Bridge beside what users write today (the DMB benchmarks).

Groups "<op>-<pass>-B32-L256-V<V>-<dtype>-<device>", rows:
- native: slimrate.ops.<op>, the fused C++ (CPU) or CUDA kernel with its closed-form backward;
- triton: the same op's Triton backend (CUDA only: on the CPU it runs in the interpreter);
- eager:  slimrate.ops.reference.<op>, DMB's op chain (one_hot → gather → cumsum → exp → diff → gather; the
          score entropy adds the dense ratio and the scatter), differentiated by autograd;
- compile: the same chain under torch.compile(dynamic=False) (inductor), compiled before the timed rounds.
ctmc_transition_rows: forward, and forward + backward to lam and h (lam from a parameter, as in matrix learning);
score_entropy: forward + backward to logscore (Q frozen, as in score learning), and ("-lam-h" groups) forward +
backward to lam and h (the score network fixed, as in matrix learning on the whole bound).  B = 32, L = 256 (a
text8 batch slice), V = 27 (text8) and 256 (bytes).

"expm_multi_t-T64-n256-<dtype>-<device>": exp(t·Q) for 64 times of one 256×256 rate matrix (exit rates ≈ 1,
t log-spaced over [1e-3, 10]: the σ̄ range of DMB's log-linear schedule), native (slimrate.ops.expm_multi_t) vs
eager (torch.linalg.matrix_exp of the batch ts·Q).

Before timing, each candidate is checked against the reference in float64 on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from slimrate import ops
from slimrate.ops import reference

B, L = 32, 256
VOCABS = [27, 256]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROUNDS = 30
CHECK_RTOL = {"fp32": 1e-4, "fp64": 1e-10}  # fp32: the chain's own error is ~1e-6 relative (flash rule in tests)


def ctmc_inputs(V: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """A batch as score learning sees it: rates a ~ U(0.05, 1.05), x0 uniform, h = σ̄(t) ∈ [0.05, 2.05],
    x_t sampled from p(·|x0), log-scores N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(L, V - 1, generator=g, dtype=torch.float64) + 0.05
    perm_inv = torch.stack([torch.randperm(V, generator=g) for _ in range(L)])
    lam = ops.ctmc_lambda(a)
    x0 = torch.randint(0, V, (B, L), generator=g)
    h = torch.rand(B, generator=g, dtype=torch.float64) * 2 + 0.05
    p = reference.ctmc_transition_rows(x0, h, lam, perm_inv.argsort(1), perm_inv)
    x_t = torch.multinomial(p.reshape(-1, V), 1, generator=g).reshape(B, L)
    out = dict(lam=lam, perm=perm_inv.argsort(1), perm_inv=perm_inv, x0=x0, h=h, x_t=x_t,
               sigma=torch.rand(B, generator=g, dtype=torch.float64) + 0.5,
               logscore=torch.randn(B, L, V, generator=g, dtype=torch.float64),
               grad_rows=torch.randn(B, L, V, generator=g, dtype=torch.float64))
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in out.items()}


def synchronized(device: str, call: Callable[[], object]) -> Callable[[], object]:
    if device != "cuda":
        return call

    def timed():
        out = call()
        torch.cuda.synchronize()
        return out
    return timed


# The op chains under torch.compile (inductor), compiled on first use per shape and dtype, outside the timed rounds.
COMPILED = {name: torch.compile(getattr(reference, name), dynamic=False)
            for name in ("ctmc_transition_rows", "score_entropy")}


def op_for(backend: str, name: str) -> Callable:
    if backend == "eager":
        return getattr(reference, name)
    if backend == "compile":
        return COMPILED[name]
    return lambda *a: getattr(ops, name)(*a, backend=backend)


def rows_step(backend: str, x: dict, with_backward: bool) -> Callable[[], object]:
    fn = op_for(backend, "ctmc_transition_rows")
    lam = x["lam"].clone().requires_grad_(with_backward)
    h = x["h"].clone().requires_grad_(with_backward)

    def step():
        out = fn(x["x0"], h, lam, x["perm"], x["perm_inv"])
        if with_backward:
            out.backward(x["grad_rows"])
        return out, lam.grad, h.grad
    return step


def score_step(backend: str, x: dict, wrt: str = "logscore") -> Callable[[], object]:
    """Forward + backward of the summed loss to logscore (score learning) or to lam and h (wrt="rates": matrix
    learning on the whole bound, the score network held fixed)."""
    fn = op_for(backend, "score_entropy")
    names = ("logscore",) if wrt == "logscore" else ("lam", "h")
    leaves = {k: x[k].clone().requires_grad_() for k in names}
    args = {**x, **leaves}

    def step():
        for t in leaves.values():
            t.grad = None
        loss = fn(*(args[k] for k in ("logscore", "x_t", "x0", "h", "sigma", "lam", "perm", "perm_inv")))
        loss.sum().backward()
        return (loss, *(t.grad for t in leaves.values()))
    return step


def assert_matches_reference(step: Callable, step64: Callable, rtol: float) -> None:
    for got, want in zip(step(), step64(), strict=True):
        if want is None:
            continue
        err = ((got.double() - want).norm() / want.norm()).item()
        if not err <= rtol:
            raise AssertionError(f"differs from slimrate.ops.reference: relative error {err:.3g} > {rtol:g}")


BACKENDS = ["native", "triton", "eager", "compile"]
CASES = [(V, d, dev) for dev in DEVICES for d in DTYPES for V in VOCABS]


def skip_triton_off_gpu(backend: str, device: str) -> None:
    if backend == "triton" and device != "cuda":
        pytest.skip("Triton runs only in the interpreter without a GPU: nothing to time")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"V{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctmc_transition_rows(benchmark, backend, passes, case):
    V, dname, device = case
    skip_triton_off_gpu(backend, device)
    x = ctmc_inputs(V, DTYPES[dname], device)
    x64 = ctmc_inputs(V, torch.float64, device)
    with_backward = passes == "fwd+bwd"
    assert_matches_reference(rows_step(backend, x, with_backward), rows_step("eager", x64, with_backward),
                             CHECK_RTOL[dname])
    benchmark.group = f"ctmc_transition_rows-{passes}-B{B}-L{L}-V{V}-{dname}-{device}"
    benchmark.extra_info.update(op="ctmc_transition_rows", backend=backend, dtype=dname, device=device, passes=passes,
                                shape=[B, L, V])
    benchmark.pedantic(synchronized(device, rows_step(backend, x, with_backward)), rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"V{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_score_entropy(benchmark, backend, case):
    V, dname, device = case
    skip_triton_off_gpu(backend, device)
    x = ctmc_inputs(V, DTYPES[dname], device)
    assert_matches_reference(score_step(backend, x), score_step("eager", ctmc_inputs(V, torch.float64, device)),
                             CHECK_RTOL[dname])
    benchmark.group = f"score_entropy-fwd+bwd-B{B}-L{L}-V{V}-{dname}-{device}"
    benchmark.extra_info.update(op="score_entropy", backend=backend, dtype=dname, device=device, passes="fwd+bwd",
                                shape=[B, L, V])
    benchmark.pedantic(synchronized(device, score_step(backend, x)), rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"V{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("backend", ["native", "triton", "eager"])
def test_score_entropy_rate_grad(benchmark, backend, case):
    V, dname, device = case
    skip_triton_off_gpu(backend, device)
    x = ctmc_inputs(V, DTYPES[dname], device)
    assert_matches_reference(score_step(backend, x, "rates"),
                             score_step("eager", ctmc_inputs(V, torch.float64, device), "rates"), CHECK_RTOL[dname])
    benchmark.group = f"score_entropy-fwd+bwd-lam-h-B{B}-L{L}-V{V}-{dname}-{device}"
    benchmark.extra_info.update(op="score_entropy", backend=backend, dtype=dname, device=device,
                                passes="fwd+bwd to lam and h", shape=[B, L, V])
    benchmark.pedantic(synchronized(device, score_step(backend, x, "rates")), rounds=ROUNDS, warmup_rounds=2)


EXPM_T, EXPM_N = 64, 256


def expm_inputs(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.rand(EXPM_N, EXPM_N, generator=g, dtype=torch.float64) * 2 / EXPM_N
    q.fill_diagonal_(0)
    q -= torch.diag(q.sum(1))
    ts = torch.logspace(-3, 1, EXPM_T, dtype=torch.float64)
    return q.to(dtype=dtype, device=device), ts.to(dtype=dtype, device=device)


EXPM_CALLS = {
    "native": lambda q, ts: ops.expm_multi_t(q, ts),
    "eager": lambda q, ts: torch.linalg.matrix_exp(ts[:, None, None] * q),
}


@pytest.mark.parametrize("case", [(d, dev) for dev in DEVICES for d in DTYPES], ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("backend", list(EXPM_CALLS))
def test_expm_multi_t(benchmark, backend, case):
    dname, device = case
    q, ts = expm_inputs(DTYPES[dname], device)
    q64, ts64 = expm_inputs(torch.float64, device)
    got, want = EXPM_CALLS[backend](q, ts).double(), reference.expm_multi_t(q64, ts64)
    err = ((got - want).norm() / want.norm()).item()
    assert err <= CHECK_RTOL[dname], f"{backend}: relative error {err:.3g} against torch.linalg.matrix_exp in fp64"
    benchmark.group = f"expm_multi_t-T{EXPM_T}-n{EXPM_N}-{dname}-{device}"
    benchmark.extra_info.update(op="expm_multi_t", backend=backend, dtype=dname, device=device, shape=[EXPM_T, EXPM_N])
    benchmark.pedantic(synchronized(device, lambda: EXPM_CALLS[backend](q, ts)), rounds=10, warmup_rounds=1)

"""rate_grad_ and rate_stats over a model-sized parameter list, beside what users write today.

rate_grad_ rows per size and device (group "rate_grad_-<size>-fp32-<device>"):
- native:  slimrate.ops.rate_grad_(params, grads, λ, ν, ε), the fused C++ (CPU) or CUDA pass;
- triton:  the same op's Triton backend (CUDA only: on the CPU it runs in the interpreter);
- eager:   the penalty a user adds today, λ·Σ((|θ|+ε)^ν)/N, then .backward() into the populated p.grad;
- compile: the same loss under torch.compile(dynamic=False), compiled and warmed up before timing;
- add:     torch.add(g, p, out=g) per tensor: the same three streams (read θ, read g, write g),
           i.e. the memory-bandwidth bound for this access pattern.
At the memory roofline (group "rate_grad_-16M-fp32-cpu-1thread", `-k roofline`): one thread, 16M fp32
weights, the native rows with the ISA the CPU picks, then forced by SLIMRATE_CPU_ISA to AVX2 and to
AVX-512 (skipped, with the reason, where the CPU lacks it), beside add; bench/summarize.py shows each
row's time as a multiple of add's.
rate_stats rows (group "rate_stats-<size>-fp32-<device>"): native vs the eager per-tensor sums,
beside a plain per-tensor t.sum() over the same bytes.  On CUDA every timed call ends with a
device synchronize, so rows time the work, not the launch.

Before the smallest size is timed, each candidate's gradient is checked against
slimrate.ops.reference on a zero-grad copy, so every row times the same work.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from builders import SIZES, model_params

import slimrate.ops
from slimrate.ops import reference

# ν = 0.7 (not 0.5 or 1) so no backend can take a special-cased power; ε = 1 and λ = 1 keep the
# grads finite however many rounds accumulate into them.
LAM, NU, EPS = 1.0, 0.7, 1.0
DTYPE = torch.float32
DTYPE_NAME = "fp32"
# Rounds per size: the slowest row (eager/compile at 64M, ~1 s a round on 2 cores) sets the total;
# the whole file runs in a few minutes.
ROUNDS = {"1M": 30, "16M": 10, "64M": 5}
CHECK_SIZE = "1M"
CHECK_RTOL = 1e-5  # fp32 element-wise pow against float64: measured ≤ 2e-7, margin for libm differences


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Model:
    """A size's params (leaf tensors, requires_grad) and grads (their .grad, same memory) on a device."""

    def __init__(self, size: str, device: str):
        self.size, self.device = size, device
        self.params, self.grads = model_params(SIZES[size], dtype=DTYPE, device=device, requires_grad=True)
        self.numel = sum(p.numel() for p in self.params)
        self.data = [p.detach() for p in self.params]  # the same storage, outside autograd


@pytest.fixture(scope="module")
def model(request) -> Model:
    return Model(*request.param)


# Ids read [backend-dtype-size-device]; module scope builds each size once for all its rows.
each_size = pytest.mark.parametrize("model", [(size, device) for device in DEVICES for size in SIZES],
                                    indirect=True, ids=lambda case: f"{DTYPE_NAME}-{case[0]}-{case[1]}")


def synchronized(m: Model, call: Callable[..., object]) -> Callable[..., object]:
    """``call`` followed by a device synchronize on CUDA (the timed work includes the kernels)."""
    if m.device != "cuda":
        return call

    def timed(*args):
        out = call(*args)
        torch.cuda.synchronize()
        return out
    return timed


def rate_loss(params: list[torch.Tensor], n: int) -> torch.Tensor:
    """What users write today: λ·R(θ) as a loss term, R = (1/N) Σ (|θ|+ε)^ν."""
    return LAM * sum(((p.abs() + EPS) ** NU).sum() for p in params) / n


compiled_rate_loss = torch.compile(rate_loss, dynamic=False)


def native_step(m: Model) -> Callable[[], object]:
    return lambda: slimrate.ops.rate_grad_(m.data, m.grads, LAM, NU, EPS, backend="native")


def triton_step(m: Model) -> Callable[[], object]:
    return lambda: slimrate.ops.rate_grad_(m.data, m.grads, LAM, NU, EPS, backend="triton")


def eager_step(m: Model) -> Callable[[], object]:
    return lambda: rate_loss(m.params, m.numel).backward()


def compile_step(m: Model) -> Callable[[], object]:
    return lambda: compiled_rate_loss(m.params, m.numel).backward()


def add_step(m: Model) -> Callable[[], object]:
    def add():
        for p, g in zip(m.data, m.grads, strict=True):
            torch.add(g, p, out=g)
    return add


RATE_GRAD_STEPS = {"native": native_step, "triton": triton_step, "eager": eager_step, "compile": compile_step,
                   "add": add_step}


def assert_same_gradient_as_reference(make_step: Callable[[Model], Callable[[], object]], device: str) -> None:
    """Run one step on zeroed grads of a CHECK_SIZE model; compare them with the reference's in float64."""
    m = Model(CHECK_SIZE, device)
    for g in m.grads:
        g.zero_()
    make_step(m)()
    want = [torch.zeros_like(p, dtype=torch.float64) for p in m.data]
    reference.rate_grad_([p.double() for p in m.data], want, LAM, NU, EPS)
    got = torch.cat([g.double().flatten() for g in m.grads])
    want = torch.cat([w.flatten() for w in want])
    err = ((got - want).norm() / want.norm()).item()
    if not err <= CHECK_RTOL:
        raise AssertionError(f"gradient differs from slimrate.ops.reference: relative error {err:.3g} "
                             f"> {CHECK_RTOL:g} over {want.numel()} elements")


def set_info(benchmark, op: str, backend: str, m: Model, bytes_moved: int) -> None:
    benchmark.group = f"{op}-{m.size}-{DTYPE_NAME}-{m.device}"
    benchmark.extra_info.update(op=op, backend=backend, dtype=DTYPE_NAME, device=m.device, size=m.size,
                                params=m.numel, tensors=len(m.params), bytes=bytes_moved,
                                lam=LAM, nu=NU, eps=EPS)


@each_size
@pytest.mark.parametrize("backend", list(RATE_GRAD_STEPS))
def test_rate_grad_(benchmark, backend: str, model: Model):
    if backend == "triton" and model.device != "cuda":
        pytest.skip("Triton runs only in the interpreter without a GPU: nothing to time")
    make_step = RATE_GRAD_STEPS[backend]
    if model.size == CHECK_SIZE and backend != "add":
        assert_same_gradient_as_reference(make_step, model.device)
    step = synchronized(model, make_step(model))
    step()  # compiles (compile row) and touches every page outside the timed rounds
    # read θ + read g + write g, fp32
    set_info(benchmark, "rate_grad_", backend, model, 3 * model.params[0].element_size() * model.numel)
    benchmark.pedantic(step, rounds=ROUNDS[model.size], warmup_rounds=1)


def rate_stats_eager(tensors: list[torch.Tensor]) -> torch.Tensor:
    """What users write today for (N, Σ|θ|, Σθ²): per-tensor sums in the tensors' dtype."""
    n = sum(t.numel() for t in tensors)
    return torch.stack([torch.tensor(float(n), device=tensors[0].device), sum(t.abs().sum() for t in tensors),
                        sum((t * t).sum() for t in tensors)])


def sum_all(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.sum()


RATE_STATS_CALLS = {
    "native": lambda ts: slimrate.ops.rate_stats(ts, backend="native"),
    "eager": rate_stats_eager,
    "sum": sum_all,
}


@each_size
@pytest.mark.parametrize("backend", list(RATE_STATS_CALLS))
def test_rate_stats(benchmark, backend: str, model: Model):
    call = synchronized(model, RATE_STATS_CALLS[backend])
    if backend != "sum":
        got = call(model.data).double()
        want = reference.rate_stats(model.data)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    set_info(benchmark, "rate_stats", backend, model, model.params[0].element_size() * model.numel)
    benchmark.pedantic(call, args=(model.data,), rounds=ROUNDS[model.size], warmup_rounds=1)


# SLIMRATE_CPU_ISA per roofline row (docs/kernels.md §8); None: the best ISA the CPU runs.
ROOFLINE_ISAS = {"native": None, "native-avx2": "avx2", "native-avx512": "avx512"}
ROOFLINE_SIZE, ROOFLINE_ROUNDS = "16M", 20


@pytest.fixture(scope="module")
def roofline_model() -> Model:
    return Model(ROOFLINE_SIZE, "cpu")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["add", *ROOFLINE_ISAS])
def test_rate_grad_roofline(benchmark, backend: str, roofline_model: Model, one_thread, monkeypatch):
    m = roofline_model
    if backend == "add":
        step = add_step(m)
    else:
        isa = ROOFLINE_ISAS[backend]
        if isa is not None:
            monkeypatch.setenv("SLIMRATE_CPU_ISA", isa)
        try:
            assert_same_gradient_as_reference(native_step, "cpu")
        except RuntimeError as err:
            if "names no instruction set this CPU runs" not in str(err):
                raise
            pytest.skip(f"this CPU cannot run {isa}: {err}")
        step = native_step(m)
    step()
    set_info(benchmark, "rate_grad_", backend, m, 3 * m.params[0].element_size() * m.numel)
    benchmark.group = f"rate_grad_-{m.size}-{DTYPE_NAME}-cpu-1thread"
    benchmark.extra_info.update(threads=1, cpu_isa=os.environ.get("SLIMRATE_CPU_ISA", "best"))
    benchmark.pedantic(step, rounds=ROOFLINE_ROUNDS, warmup_rounds=1)

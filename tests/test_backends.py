"""The op registry (ops/backend.py), walked whole: every op × every backend in BACKENDS either runs on small
random inputs and matches the op's reference, or raises the one ValueError naming the op, the backend and the
backends the op has — chosen by ``backend=`` and by ``SLIMRATE_BACKEND`` alike.

Each entry's accuracy is judged in its family's tests (test_rate_ops.py, test_sparse*.py, test_nf4*.py,
test_ctmc.py, test_coding_ops.py); here the tolerance only has to tell a wrongly wired entry from the right
one: float outputs agree to 1e-4 relative (float32 sums of at most a few hundred terms; the other inputs are
float64), integer outputs exactly.
"""

import inspect
import re

import pytest
import torch

from slimrate import ops
from slimrate.ops import reference
from slimrate.ops.backend import BACKENDS, available_backends, pick_backend, registered_ops

from helpers import DEVICES, random_sparse, skip_unless_backend

# ops.__all__ names that are not registry ops (module docstring of slimrate.ops): the registry's read API and
# plain PyTorch/Python helpers that take no backend.
NOT_OPS = {"BACKENDS", "available_backends", "extension_available", "registered_ops", "quantize", "dequantize",
           "ctmc_lambda", "rans_header_size", "DEFAULT_CHUNK_NUMEL"}
# Registry ops without a face of their own: called by nf4_dequantize / nf4_lora_linear for a nested QuantState.
INTERNAL_OPS = {"nf4_absmax_dequantize"}
HOW = ["backend=", "SLIMRATE_BACKEND"]


# ---- one call per op: case(device) -> (call(backend) -> output, want() -> expected output) ----

def against_reference(call):
    """A case whose expected output is its call on the reference backend, on the same inputs."""
    return call, lambda: call("reference")


def case_rate_stats(device):
    xs = [torch.randn(5, 7, device=device), torch.randn(11, device=device)]
    return against_reference(lambda backend: ops.rate_stats(xs, backend=backend))


def case_rate_grad_(device):
    params = [torch.randn(5, 7, device=device), torch.randn(11, device=device)]
    grads = [torch.randn_like(p) for p in params]

    def call(backend):
        gs = [g.clone() for g in grads]
        return ops.rate_grad_(params, gs, 0.3, 0.7, 1e-2, backend=backend), gs

    return against_reference(call)


def symbols(n=40):
    return torch.randint(-50, 50, (n,), dtype=torch.int32)


def case_eg_code_length(device):
    s = symbols()
    return against_reference(lambda backend: ops.eg_code_length(s, 1, backend=backend))


def case_eg_encode(device):
    s = symbols()
    return against_reference(lambda backend: ops.eg_encode(s, 1, backend=backend))


def case_eg_decode(device):
    s = symbols()
    buf = reference.eg_encode(s, 2)
    return against_reference(lambda backend: ops.eg_decode(buf, s.numel(), 2, backend=backend))


def case_rans_encode(device):
    s = symbols()
    return against_reference(lambda backend: ops.rans_encode(s, backend=backend))


def case_rans_decode(device):
    s = symbols()
    buf = reference.rans_encode(s)
    return against_reference(lambda backend: ops.rans_decode(buf, s.numel(), backend=backend))


def case_slim_encode(device):
    skip_unless_backend("native", "cpu")  # the reference composes the native coders
    x = torch.randn(7, 13) * 0.02
    return against_reference(lambda backend: ops.slim_encode(x, 0.002, "eg", 40, backend=backend))


def case_slim_decode(device):
    skip_unless_backend("native", "cpu")
    x = torch.randn(7, 13) * 0.02
    payload, layout = reference.slim_encode(x, 0.002, "rans", 40)
    return against_reference(
        lambda backend: ops.slim_decode(payload, layout, x.numel(), 0.002, "rans", 40, torch.float32, backend=backend))


def case_sparse_linear(device):
    _, sm = random_sparse(6, 9, 0.4, torch.float32, (2, 3), device)
    x, bias = torch.randn(3, 9, device=device), torch.randn(6, device=device)
    return against_reference(lambda backend: ops.sparse_linear(x, sm, bias, backend=backend))


def case_nf4_quantize(device):
    w = torch.randn(4, 64, device=device)
    return against_reference(lambda backend: ops.nf4_quantize(w, 64, backend=backend))


def case_nf4_dequantize(device):
    packed, absmax = reference.nf4_quantize(torch.randn(4, 64, device=device), 64)
    return against_reference(lambda backend: ops.nf4_dequantize(packed, absmax, (4, 64), 64, backend=backend))


def case_nf4_absmax_dequantize(device):
    qabsmax = torch.randint(0, 256, (300,), dtype=torch.uint8, device=device)
    code = torch.randn(256, device=device).sort().values
    absmax2, offset = torch.rand(2, device=device), torch.rand((), device=device)  # ceil(300 / 256) = 2 blocks
    return against_reference(lambda backend: pick_backend("nf4_absmax_dequantize", backend, qabsmax.device)(
        qabsmax, code, absmax2, offset, 256))


def case_nf4_lora_linear(device):
    packed, absmax = reference.nf4_quantize(torch.randn(5, 64, device=device), 64)
    x, bias = torch.randn(3, 64, device=device), torch.randn(5, device=device)
    lora_A, lora_B = torch.randn(2, 64, device=device), torch.randn(5, 2, device=device)
    return against_reference(
        lambda backend: ops.nf4_lora_linear(x, packed, absmax, lora_A, lora_B, 0.5, bias, backend=backend))


def ctmc_inputs(device, B=3, L=2, V=5):
    """x0, h, lam, perm, perm_inv and an x_t drawn from p(· | x0), float64."""
    lam = ops.ctmc_lambda(torch.rand(L, V - 1, dtype=torch.float64) + 0.05).to(device)
    perm_inv = torch.stack([torch.randperm(V) for _ in range(L)]).to(device)
    perm = perm_inv.argsort(1)
    x0 = torch.randint(0, V, (B, L), device=device)
    h = torch.rand(B, dtype=torch.float64, device=device) + 0.1
    rows = reference.ctmc_transition_rows(x0, h, lam, perm, perm_inv)
    x_t = torch.multinomial(rows.reshape(B * L, V), 1).reshape(B, L)
    return x0, h, lam, perm, perm_inv, x_t


def case_ctmc_transition_rows(device):
    x0, h, lam, perm, perm_inv, _ = ctmc_inputs(device)
    return against_reference(
        lambda backend: ops.ctmc_transition_rows(x0, h, lam, perm, perm_inv, backend=backend))


def case_ctmc_rate_cols(device):
    x0, _, lam, perm, perm_inv, _ = ctmc_inputs(device)
    return against_reference(lambda backend: ops.ctmc_rate_cols(x0, lam, perm, perm_inv, backend=backend))


def case_score_entropy(device):
    x0, h, lam, perm, perm_inv, x_t = ctmc_inputs(device)
    logscore = torch.randn(*x0.shape, lam.shape[1], dtype=torch.float64, device=device)
    sigma = torch.rand(x0.shape[0], dtype=torch.float64, device=device)
    return against_reference(
        lambda backend: ops.score_entropy(logscore, x_t, x0, h, sigma, lam, perm, perm_inv, backend=backend))


def case_expm(device):
    q = torch.randn(2, 3, 3, dtype=torch.float64, device=device)
    return against_reference(lambda backend: ops.expm(q, backend=backend))


def case_expm_multi_t(device):
    q = torch.randn(3, 3, dtype=torch.float64, device=device)
    return against_reference(lambda backend: ops.expm_multi_t(q, [0.5, -1.0, 2.0], backend=backend))


CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}


def choose(call, backend: str, how: str, monkeypatch):
    """call run on ``backend``, named by ``backend=`` or by SLIMRATE_BACKEND."""
    if how == "backend=":
        return call(backend)
    monkeypatch.setenv("SLIMRATE_BACKEND", backend)
    return call(None)


def device_for(backend: str) -> str:
    """Triton runs on the GPU where there is one, else in the interpreter on the CPU (conftest.py)."""
    return DEVICES[-1] if backend == "triton" else "cpu"


# ---- the table ----

def test_registry_holds_every_op_of_ops_all():
    """An op added to slimrate.ops without a registry entry (or a stale entry) fails here."""
    assert set(registered_ops()) == (set(ops.__all__) - NOT_OPS) | INTERNAL_OPS


def test_every_registered_op_has_a_case_here():
    assert set(CASES) == set(registered_ops())


@pytest.mark.parametrize("op", sorted(set(registered_ops()) - INTERNAL_OPS))
def test_every_op_face_takes_backend(op):
    parameter = inspect.signature(getattr(ops, op)).parameters.get("backend")
    assert parameter is not None and parameter.kind == inspect.Parameter.KEYWORD_ONLY and parameter.default is None


@pytest.mark.parametrize("op", registered_ops())
def test_every_op_has_a_native_backend(op):
    assert available_backends(op)[0] == "native"  # the default must exist for every op


def test_available_backends_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="op: 'nf5_quantize' is not a registered op"):
        available_backends("nf5_quantize")


# ---- every op × every backend ----

PAIRS = [(op, backend) for op in registered_ops() for backend in BACKENDS]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("op,backend", [p for p in PAIRS if p[1] in available_backends(p[0])])
def test_op_on_a_backend_it_has_matches_its_reference(op, backend, how, monkeypatch):
    device = device_for(backend)
    skip_unless_backend(backend, device)
    call, want = CASES[op](device)
    assert_same(choose(call, backend, how, monkeypatch), want())


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("op,backend", [p for p in PAIRS if p[1] not in available_backends(p[0])])
def test_op_on_a_backend_it_lacks_raises_one_error(op, backend, how, monkeypatch):
    available = available_backends(op)
    call, _ = CASES[op]("cpu")
    with pytest.raises(ValueError, match=rf"^backend: {op} has no '{backend}' backend.*; it has "
                                         rf"{re.escape(str(available))}"):
        choose(call, backend, how, monkeypatch)


def assert_same(got, want) -> None:
    if isinstance(want, torch.Tensor) and want.is_floating_point():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), f"integer outputs differ: {got} vs {want}"
    else:
        assert got == want


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("op", registered_ops())
def test_unknown_backend_lists_the_valid_names(op, how, monkeypatch):
    call, _ = CASES[op]("cpu")
    with pytest.raises(ValueError, match=r"^backend: expected one of \('native', 'triton', 'reference'\)"):
        choose(call, "fast", how, monkeypatch)


def test_explicit_backend_wins_over_slimrate_backend(monkeypatch):
    monkeypatch.setenv("SLIMRATE_BACKEND", "triton")
    s = torch.randint(-50, 50, (40,), dtype=torch.int32)
    assert torch.equal(ops.eg_encode(s, backend="reference"), reference.eg_encode(s))


def test_missing_backend_from_slimrate_backend_says_so(monkeypatch):
    monkeypatch.setenv("SLIMRATE_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"eg_encode has no 'triton' backend \(from SLIMRATE_BACKEND=triton\)"):
        ops.eg_encode(torch.zeros(3, dtype=torch.int32))

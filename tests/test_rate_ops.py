"""rate_stats and rate_grad_ on every backend against the float64 reference (ops/reference.py)."""

import pytest
import torch

from slimrate import ops
from slimrate.ops import reference

from helpers import DEVICES, DTYPE_IDS, assert_close_flash, rel_err, skip_unless_backend

BACKENDS = ["native", "triton", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Lists of tensor shapes: odd sizes, single elements, empty tensors, and one list larger than the
# C++ kernel's 64 Ki-element chunk so several chunks of one tensor run in parallel.
SHAPE_LISTS = {
    "odd": [(5, 123), (127,), (3, 7, 11), (1,)],
    "empty": [(0,), (4, 0)],
    "with-empty": [(0,), (33, 17), (0, 3)],
    "chunks": [(300, 257), (19,)],
}
# Moment sums: float64 accumulation in C++ and the reference; Triton accumulates float32 partials of
# at most one block each, then float64 (relative error of a few float32 ulps).
STATS_RTOL = {"native": 1e-12, "reference": 1e-12, "triton": 1e-6}


def make_params(shapes, dtype, device, scale=0.05):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype=dtype, device=device) for s in shapes]


def run_rate_grad(backend, params, lam, nu, eps, grads=None):
    """Returns (R, grads after the call); grads default to fresh N(0, 0.1²) values."""
    if grads is None:
        grads = [torch.randn_like(p) * 0.1 for p in params]
    r = ops.rate_grad_(params, grads, lam, nu, eps, backend=backend)
    return r, grads


def check_rate_grad(backend, shapes, dtype, device, nu, eps, noncontiguous=False):
    params = make_params(shapes, dtype, device)
    grads0 = [torch.randn_like(p) * 0.1 for p in params]
    if noncontiguous:  # transposed views of tensors with their own storage
        params = [p.t().contiguous().t() if p.dim() == 2 else p for p in params]
        grads0 = [g.t().contiguous().t() if g.dim() == 2 else g for g in grads0]
    n = sum(p.numel() for p in params)
    lam = float(max(n, 1))  # so lam·ν/N is O(1) and the update is not lost in the grad's rounding
    grads = [g.clone() for g in grads0]
    r = ops.rate_grad_(params, grads, lam, nu, eps, backend=backend)
    grads64 = [g.double() for g in grads0]
    r64 = reference.rate_grad_([p.double() for p in params], grads64, lam, nu, eps)
    grads_same = [g.clone() for g in grads0]
    r_same = reference.rate_grad_(params, grads_same, lam, nu, eps)
    assert r.dtype == torch.float64 and r.shape == () and r.device.type == device
    if n == 0:
        assert r.item() == 0.0
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0, strict=False))
        return
    # R is a sum of n terms: another summation order may differ by about √n ulps (random walk).
    assert_close_flash(r.reshape(1), r_same.reshape(1), r64.reshape(1), dtype, ulps=4 + int(n**0.5), what="R")
    for i, (g, gs, g64) in enumerate(zip(grads, grads_same, grads64, strict=False)):
        assert g.dtype == dtype and g.shape == g64.shape
        if g.numel():
            assert_close_flash(g, gs, g64, dtype, what=f"grads[{i}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_grad_matches_reference(backend, dtype, shapes, device):
    skip_unless_backend(backend, device)
    check_rate_grad(backend, shapes, dtype, device, nu=0.7, eps=1e-2)


@pytest.mark.parametrize("nu,eps", [(0.5, 1.0), (1.0, 1e-3), (2.0, 0.0), (0.3, 0.0), (2.7, 1e-6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_grad_matches_reference_over_nu_and_eps(backend, nu, eps):
    skip_unless_backend(backend, "cpu")
    check_rate_grad(backend, SHAPE_LISTS["odd"], torch.float32, "cpu", nu=nu, eps=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_grad_handles_noncontiguous_inputs(backend, dtype):
    skip_unless_backend(backend, "cpu")
    check_rate_grad(backend, [(37, 29), (64, 3), (11,)], dtype, "cpu", nu=0.8, eps=1e-2, noncontiguous=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_grad_zero_weight_has_zero_gradient_with_eps_zero(backend):
    skip_unless_backend(backend, "cpu")
    p = torch.randn(50)
    p[::7] = 0.0
    g = torch.randn(50)
    expected = g.clone()
    r = ops.rate_grad_([p], [g], 3.0, 0.5, 0.0, backend=backend)
    assert torch.equal(g[::7], expected[::7]), "sign(0) = 0: zero weights must get no gradient"
    assert torch.isfinite(g).all() and torch.isfinite(r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_grad_in_place_on_params_applies_decoupled_shrink(backend):
    skip_unless_backend(backend, "cpu")
    params = make_params([(40, 31), (9,)], torch.float32, "cpu", scale=0.5)
    before = [p.double() for p in params]
    expected = [p.clone() for p in before]
    r64 = reference.rate_grad_(before, expected, -2.0, 0.6, 1.0)
    r = ops.rate_grad_(params, params, -2.0, 0.6, 1.0, backend=backend)
    assert abs(r.item() - r64.item()) <= 1e-6 * abs(r64.item())
    for p, e in zip(params, expected, strict=False):
        assert rel_err(p, e) <= 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("nu", [0.3, 1.6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_grad_handles_denormal_weights_with_eps_zero(backend, nu):
    """With ε = 0, |θ| + ε can be a float32 denormal (the C++ power scales those before its log2)."""
    skip_unless_backend(backend, "cpu")
    tiny = torch.finfo(torch.float32).tiny
    p = (torch.rand(300, dtype=torch.float64) * tiny * torch.randn(300).sign()).float()
    p[::50] = 0.0
    g = torch.zeros_like(p)
    g64, g_same = g.double(), g.clone()
    reference.rate_grad_([p.double()], [g64], 1.0, nu, 0.0)
    reference.rate_grad_([p], [g_same], 1.0, nu, 0.0)
    ops.rate_grad_([p], [g], 1.0, nu, 0.0, backend=backend)
    # A float32 power 2^y or e^y rounds its exponent y = (ν−1)·ln|θ|: |y| ulps (64 here) come with the input.
    ill_conditioning = ((nu - 1) * p[p != 0].double().abs().log()).abs().max().item()
    assert_close_flash(g, g_same, g64, torch.float32, ulps=int(4 + ill_conditioning), what="grads[0]")


# SLIMRATE_CPU_ISA values of the native CPU kernel (docs/kernels.md §8); a CPU without one refuses it.
CPU_ISAS = ["generic", "avx2", "avx512"]
ISA_REFUSED = "SLIMRATE_CPU_ISA names no instruction set this CPU runs"


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_rate_grad_native_forced_cpu_isa_matches_reference(isa, monkeypatch):
    """Each ISA's code (SLIMRATE_CPU_ISA is read at every call) on every dtype, and on float32 over ν and ε,
    the exact paths of ν = ½, 1, 2 included."""
    skip_unless_backend("native", "cpu")
    monkeypatch.setenv("SLIMRATE_CPU_ISA", isa)
    try:
        ops.rate_grad_([torch.ones(1)], [torch.zeros(1)], 1.0, 0.7, 1.0, backend="native")
    except RuntimeError as err:
        if isa == "generic" or ISA_REFUSED not in str(err):
            raise
        pytest.skip(f"this CPU cannot run {isa}")
    for dtype in DTYPES:
        check_rate_grad("native", SHAPE_LISTS["chunks"], dtype, "cpu", nu=0.7, eps=1e-2)
    for nu, eps in [(0.5, 1.0), (1.0, 1e-3), (2.0, 0.0), (0.3, 0.0), (2.6, 1.0)]:
        check_rate_grad("native", SHAPE_LISTS["odd"], torch.float32, "cpu", nu=nu, eps=eps)


def test_rate_grad_native_rejects_an_unknown_cpu_isa(monkeypatch):
    skip_unless_backend("native", "cpu")
    monkeypatch.setenv("SLIMRATE_CPU_ISA", "avx9")
    with pytest.raises(RuntimeError, match=ISA_REFUSED):
        ops.rate_grad_([torch.randn(3)], [torch.randn(3)], 1.0, 0.5, 1.0, backend="native")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_stats_matches_reference(backend, dtype, shapes, device):
    skip_unless_backend(backend, device)
    tensors = make_params(shapes, dtype, device, scale=1.0)
    out = ops.rate_stats(tensors, backend=backend)
    ref = reference.rate_stats(tensors)
    assert out.dtype == torch.float64 and out.shape == (3,) and out.device.type == device
    assert out[0].item() == sum(t.numel() for t in tensors)
    torch.testing.assert_close(out, ref, rtol=STATS_RTOL[backend], atol=1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_stats_handles_noncontiguous_inputs(backend):
    skip_unless_backend(backend, "cpu")
    base = torch.randn(64, 48)
    tensors = [base[::2, 1::3], base.t()]
    out = ops.rate_stats(tensors, backend=backend)
    torch.testing.assert_close(out, reference.rate_stats([t.contiguous() for t in tensors]),
                               rtol=STATS_RTOL[backend], atol=0.0)


def test_empty_lists_give_zeros():
    assert torch.equal(ops.rate_stats([]), torch.zeros(3, dtype=torch.float64))
    assert ops.rate_grad_([], [], 1.0, 0.5, 1.0).item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_native_cpu_results_do_not_depend_on_the_thread_count(dtype):
    """The C++ kernels add per-chunk partial sums in chunk order: 1, 2 and 3 threads (torch.set_num_threads)
    give the same bits on lists of several 64 Ki-element chunks."""
    skip_unless_backend("native", "cpu")
    params = make_params([(300, 257), (200, 300), (19,)], dtype, "cpu")
    grads0 = [torch.randn_like(p) for p in params]
    threads_before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads = [g.clone() for g in grads0]
            r = ops.rate_grad_(params, grads, 1e3, 0.7, 1e-2, backend="native")
            runs.append([ops.rate_stats(params, backend="native"), r, *grads])
    finally:
        torch.set_num_threads(threads_before)
    for threads, run in zip((2, 3), runs[1:], strict=True):
        for i, (got, want) in enumerate(zip(run, runs[0], strict=True)):
            assert torch.equal(got, want), f"output {i} on {threads} threads differs from 1 thread's"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_native_ops(device):
    skip_unless_backend("native", device)
    params = make_params([(17, 5), (3,)], torch.float32, device)
    grads = [torch.randn_like(p) for p in params]
    torch.library.opcheck(torch.ops.slimrate.rate_stats.default, (params,))
    torch.library.opcheck(torch.ops.slimrate.rate_grad_.default, (params, grads, 2.0, 0.7, 1e-2))


def test_rate_grad_under_torch_compile_fullgraph():
    skip_unless_backend("native", "cpu")
    params = make_params([(33, 9), (7,)], torch.float32, "cpu")
    grads = [torch.randn_like(p) for p in params]
    grads_eager = [g.clone() for g in grads]

    @torch.compile(fullgraph=True)
    def step(ps, gs):
        stats = ops.rate_stats(ps)
        return ops.rate_grad_(ps, gs, 5.0, 0.7, 1e-2), stats

    r, stats = step(params, grads)
    r_eager = ops.rate_grad_(params, grads_eager, 5.0, 0.7, 1e-2)
    torch.testing.assert_close(r, r_eager)
    torch.testing.assert_close(stats, ops.rate_stats(params))
    for g, ge in zip(grads, grads_eager, strict=False):
        torch.testing.assert_close(g, ge)


# ---- bad inputs: each check has its test -------------------------------------------------------

def test_rate_grad_rejects_mismatched_list_lengths():
    with pytest.raises(ValueError, match="grads: expected one gradient per parameter"):
        ops.rate_grad_([torch.randn(3), torch.randn(2)], [torch.randn(3)], 1.0, 0.5, 1.0)


def test_rate_grad_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"grads\[0\]: expected shape \(3,\)"):
        ops.rate_grad_([torch.randn(3)], [torch.randn(4)], 1.0, 0.5, 1.0)


def test_rate_grad_rejects_mismatched_dtypes():
    with pytest.raises(ValueError, match=r"grads\[0\]: expected .*torch.float32"):
        ops.rate_grad_([torch.randn(3)], [torch.randn(3, dtype=torch.float64)], 1.0, 0.5, 1.0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_rate_ops_reject_integer_tensors(dtype):
    bad = torch.ones(4, dtype=dtype)
    with pytest.raises(TypeError, match=r"params\[1\]: expected a float dtype"):
        ops.rate_grad_([torch.randn(4), bad], [torch.randn(4), bad], 1.0, 0.5, 1.0)
    with pytest.raises(TypeError, match=r"tensors\[0\]: expected a float dtype"):
        ops.rate_stats([bad])


@pytest.mark.parametrize("nu", [0.0, -1.0, float("nan")])
def test_rate_grad_rejects_bad_nu(nu):
    with pytest.raises(ValueError, match="nu"):
        ops.rate_grad_([torch.randn(3)], [torch.randn(3)], 1.0, nu, 1.0)


def test_rate_grad_rejects_negative_eps():
    with pytest.raises(ValueError, match="eps: expected a value >= 0"):
        ops.rate_grad_([torch.randn(3)], [torch.randn(3)], 1.0, 0.5, -1e-3)


def test_rate_grad_rejects_non_number_lam():
    with pytest.raises(TypeError, match="lam: expected a Python number"):
        ops.rate_grad_([torch.randn(3)], [torch.randn(3)], torch.tensor(1.0), 0.5, 1.0)


def test_rate_ops_reject_mixed_devices():
    with pytest.raises(ValueError, match=r"tensors\[1\]: all tensors must be on one device"):
        ops.rate_stats([torch.randn(3), torch.randn(3, device="meta")])


def test_rate_ops_reject_a_bare_tensor():
    with pytest.raises(TypeError, match="wrap a single tensor"):
        ops.rate_stats(torch.randn(3))


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="native.*triton.*reference"):
        ops.rate_stats([torch.randn(3)], backend="fast")


def test_native_kernel_checks_keep_direct_calls_safe():
    skip_unless_backend("native", "cpu")
    with pytest.raises(RuntimeError, match="expected float32/float64/bfloat16/float16"):
        torch.ops.slimrate.rate_stats([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match=r"grads\[0\]: expected shape"):
        torch.ops.slimrate.rate_grad_([torch.randn(3)], [torch.randn(5)], 1.0, 0.5, 1.0)


def test_missing_extension_raises_import_error_with_build_command(monkeypatch):
    from slimrate.ops import backend

    monkeypatch.setattr(backend, "_EXTENSION", None)
    with pytest.raises(ImportError, match="make build"):
        ops.rate_stats([torch.randn(3)], backend="native")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.rate_stats([torch.randn(3)], backend="triton")



def shared_memory_cases():
    """name -> (params, grads, the pair the error names): grads that share memory where they must not."""
    p = [torch.randn(4, 4) for _ in range(3)]
    g = [torch.randn(4, 4) for _ in range(3)]
    flat = torch.randn(40)
    wide = torch.randn(4, 8)
    many_p = [torch.randn(3) for _ in range(300)]
    many_g = [torch.randn(3) for _ in range(300)]
    many_g[299] = many_g[7]
    return {
        "same-grad-twice": (p, [g[0], g[1], g[0]], r"grads\[0\] and grads\[2\]"),
        "overlapping-views": (p[:2], [flat[:16].view(4, 4), flat[10:26].view(4, 4)], r"grads\[0\] and grads\[1\]"),
        "grad-is-another-param": (p, [g[0], p[0], g[2]], r"grads\[1\] and params\[0\]"),
        "grad-is-own-param-transposed": (p[:1], [p[0].t()], r"grads\[0\] and params\[0\]"),
        "grad-is-own-param-shifted": ([flat[:39]], [flat[1:]], r"grads\[0\] and params\[0\]"),
        # disjoint elements, overlapping spans: refused (spans are what is compared)
        "interleaved-columns": (p[:2], [wide[:, 0::2], wide[:, 1::2]], r"grads\[0\] and grads\[1\]"),
        "300-tensors": (many_p, many_g, r"grads\[7\] and grads\[299\]"),
    }


@pytest.mark.parametrize("case", list(shared_memory_cases()))
def test_rate_grad_rejects_grads_that_share_memory(case):
    params, grads, pair = shared_memory_cases()[case]
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match=rf"^{pair}: share memory;.*pass separate tensors"):
        ops.rate_grad_(params, grads, 1.0, 0.5, 1.0)
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True)), "nothing is written when refused"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_grad_accepts_disjoint_views_and_shared_params(backend):
    """Grads as adjacent views of one flat buffer, and one param listed twice (read twice, separate grads)."""
    skip_unless_backend(backend, "cpu")
    p = make_params([(5, 7), (11,)], torch.float32, "cpu", scale=0.5)
    params = [p[0], p[1], p[0]]
    flat = torch.randn(35 + 11 + 35) * 0.1
    grads = [flat[:35].view(5, 7), flat[35:46], flat[46:].view(5, 7)]
    expected = [g.double() for g in grads]
    r64 = reference.rate_grad_([q.double() for q in params], expected, 30.0, 0.6, 1e-2)
    r = ops.rate_grad_(params, grads, 30.0, 0.6, 1e-2, backend=backend)
    assert abs(r.item() - r64.item()) <= 1e-6 * abs(r64.item())
    for g, e in zip(grads, expected, strict=True):
        assert rel_err(g, e) <= 4 * torch.finfo(torch.float32).eps


def test_rate_grad_overlap_check_is_fast_for_many_tensors():
    """One sort: 20,000 tensors take about 0.1 s here, where comparing every pair (2·10⁸ pairs) takes minutes."""
    import time

    from slimrate.ops.checks import check_separate_grads

    params = [torch.randn(2) for _ in range(20_000)]
    grads = [torch.randn(2) for _ in range(20_000)]
    start = time.perf_counter()
    check_separate_grads(params, grads)
    assert time.perf_counter() - start < 5.0

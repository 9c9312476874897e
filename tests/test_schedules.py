"""UBA and the baseline schedules against independent computations (numpy from docs/uba.md §2, torch's and
transformers' own schedulers), their LRScheduler behaviour, bad arguments, and `slimrate schedules plot`."""

import io
import math

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, OneCycleLR

from slimrate.cli import main
from slimrate.schedules import (
    SCHEDULES,
    UBA,
    get_uba_schedule,
    lr_curve,
    make_schedule,
    uba_lr,
    uba_shape,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Float64 schedules computed two ways (closed form vs torch's recursive updates, or algebraically different
# forms) agree to a few ulps of values <= 1; 1e-12 leaves room for ~1000 recursive steps and still fails on
# any real difference (the smallest step between neighbouring lrs here is > 1e-7).
TOL = 1e-12


def rand_int(low: int, high: int) -> int:
    """A fresh integer in [low, high) from the per-test seed (conftest.py)."""
    return int(torch.randint(low, high, ()).item())


def rand_uniform(low: float, high: float, n: int | None = None):
    values = low + (high - low) * torch.rand(n or 1, dtype=torch.float64).numpy()
    return values if n else float(values[0])


def uba_eta_reference(t: np.ndarray, T: int, eta_max: float, eta_min: float, phi: float) -> np.ndarray:
    """docs/uba.md §2's third-party form as printed (not the normalised form the code uses): c = cos(πt/T),
    η = η_min + (η_max − η_min)·2(1 + c) / (2φ + (2 − φ)(1 + c))."""
    c = np.cos(np.pi * np.asarray(t, dtype=np.float64) / T)
    return eta_min + (eta_max - eta_min) * 2 * (1 + c) / (2 * phi + (2 - phi) * (1 + c))


def reference_lr(factor, steps: np.ndarray, total: int, warmup: int, max_lr: float, min_lr: float) -> np.ndarray:
    """The module contract in numpy: linear warm-up from min_lr, then factor(progress), progress clamped to 1."""
    steps = np.asarray(steps, dtype=np.float64)
    progress = np.clip((steps - warmup) / (total - warmup), 0.0, 1.0)
    ramp = min_lr + (max_lr - min_lr) * steps / max(warmup, 1)
    return np.where(steps < warmup, ramp, min_lr + (max_lr - min_lr) * factor(progress))


def run_scheduler(scheduler, steps: int) -> list[list[float]]:
    """get_last_lr() after construction and after each of ``steps`` optimizer/scheduler steps."""
    optimizer = scheduler.optimizer
    lrs = [list(scheduler.get_last_lr())]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(list(scheduler.get_last_lr()))
        assert lrs[-1] == [group["lr"] for group in optimizer.param_groups]
    return lrs


def two_group_optimizer(lrs: tuple[float, float]) -> torch.optim.Optimizer:
    params = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    return torch.optim.SGD([{"params": [params[0]], "lr": lrs[0]}, {"params": [params[1]], "lr": lrs[1]}], lr=lrs[0])


def random_groups() -> tuple[tuple[float, float], float]:
    """Two group lrs a decade apart and an absolute floor below both."""
    lrs = (rand_uniform(0.05, 0.5), rand_uniform(0.005, 0.05))
    return lrs, rand_uniform(0.05, 0.9) * min(lrs)


# ---- the UBA closed form ---------------------------------------------------------------------------------------

def test_uba_shape_matches_uba_md_formula():
    T = rand_int(50, 5000)
    t = np.sort(torch.randint(0, T + 1, (40,)).numpy())
    for phi in rand_uniform(0.05, 30.0, 6):
        got = np.array([uba_shape(ti / T, phi) for ti in t])
        np.testing.assert_allclose(got, uba_eta_reference(t, T, 1.0, 0.0, phi), rtol=0, atol=TOL)


@pytest.mark.parametrize("phi,row", [
    (0.5, [1, .959, .800, .407, 0]),
    (1.0, [1, .921, .667, .255, 0]),
    (2.0, [1, .854, .500, .146, 0]),
    (4.0, [1, .745, .333, .079, 0]),
    (10.0, [1, .538, .167, .033, 0]),
])
def test_uba_shape_matches_uba_md_table(phi, row):
    # the table's 3 printed decimals: ±5e-4
    got = [uba_shape(p, phi) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    np.testing.assert_allclose(got, row, rtol=0, atol=5e-4)


def test_uba_shape_with_phi_2kappa_is_the_chebyshev_schedule():
    # minimax step sizes for curvature in [μ, L]: 1/η = (L+μ)/2 − (L−μ)/2·cos(πp), from 1/μ down to 1/L
    mu = rand_uniform(0.1, 2.0)
    for kappa in rand_uniform(1.05, 50.0, 4):
        L = kappa * mu
        p = rand_uniform(0.0, 1.0, 25)
        eta = 1.0 / ((L + mu) / 2 - (L - mu) / 2 * np.cos(np.pi * p))
        expected = (eta - 1 / L) / (1 / mu - 1 / L)
        np.testing.assert_allclose([uba_shape(pi, 2 * kappa) for pi in p], expected, rtol=0, atol=TOL)


def test_uba_shape_falls_with_progress_and_with_phi():
    p = np.linspace(0.0, 1.0, 501)
    phis = np.sort(np.exp(rand_uniform(math.log(0.05), math.log(50.0), 5)))
    curves = np.array([[uba_shape(pi, phi) for pi in p] for phi in phis])
    assert np.all(np.diff(curves, axis=1) <= 0), "u must be non-increasing in progress"
    assert np.all(np.diff(curves[:, 1:-1], axis=0) < 0), "a larger φ must give a lower u at every interior point"
    assert np.all(curves[:, 0] == 1.0) and np.all(curves[:, -1] == 0.0)


def test_uba_lr_matches_formula_with_warmup_and_floor():
    total, phi = rand_int(20, 3000), rand_uniform(0.1, 10.0)
    warmup = rand_int(0, total // 2)
    max_lr = rand_uniform(1e-4, 1.0)
    min_lr = rand_uniform(0.0, 0.5) * max_lr
    steps = np.arange(total + 5)
    expected = reference_lr(lambda p: uba_eta_reference(p, 1, 1.0, 0.0, phi), steps, total, warmup, max_lr, min_lr)
    got = [uba_lr(int(s), total, max_lr, min_lr=min_lr, phi=phi, warmup_steps=warmup) for s in steps]
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL * max_lr)


def test_uba_lr_warms_up_linearly_from_min_lr_then_decays_monotonically():
    total, phi = rand_int(100, 1000), rand_uniform(0.2, 8.0)
    warmup = rand_int(5, total // 3)
    max_lr, min_lr = 0.3, rand_uniform(0.0, 0.1)
    lrs = np.array([uba_lr(s, total, max_lr, min_lr, phi, warmup) for s in range(total + 1)])
    assert lrs[0] == min_lr and lrs[warmup] == max_lr and lrs[total] == min_lr
    np.testing.assert_allclose(np.diff(lrs[:warmup + 1]), (max_lr - min_lr) / warmup, rtol=1e-12)
    assert np.all(np.diff(lrs[warmup:]) <= 0)


def test_uba_lr_holds_min_lr_past_the_budget():
    total = rand_int(10, 500)
    for step in (total, total + 1, total + rand_int(2, 10 * total)):
        assert uba_lr(step, total, 0.1, 0.003, phi=rand_uniform(0.1, 10.0)) == 0.003


@pytest.mark.parametrize("kwargs,argument", [
    ({"total_steps": 0}, "total_steps"),
    ({"total_steps": -3}, "total_steps"),
    ({"total_steps": 10.5}, "total_steps"),
    ({"phi": 0.0}, "phi"),
    ({"phi": -1.0}, "phi"),
    ({"phi": math.nan}, "phi"),
    ({"phi": math.inf}, "phi"),
    ({"min_lr": 0.2}, "min_lr"),
    ({"min_lr": -1e-3}, "min_lr"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 100}, "warmup_steps"),
    ({"warmup_steps": 150}, "warmup_steps"),
    ({"step": -1}, "step"),
])
def test_uba_lr_rejects_bad_arguments(kwargs, argument):
    arguments = {"step": 5, "total_steps": 100, "max_lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=f"^{argument}: expected"):
        uba_lr(**arguments)


def test_uba_shape_rejects_progress_outside_unit_interval():
    with pytest.raises(ValueError, match="^progress: expected"):
        uba_shape(1.5, 2.0)


# ---- UBA as an LRScheduler -------------------------------------------------------------------------------------

def test_uba_scheduler_two_groups_with_absolute_floor_matches_uba_lr():
    (lr0, lr1), min_lr = random_groups()
    total, phi = rand_int(30, 200), rand_uniform(0.2, 8.0)
    warmup = rand_int(1, total // 3)
    scheduler = UBA(two_group_optimizer((lr0, lr1)), total, phi=phi, min_lr=min_lr, warmup_steps=warmup)
    got = np.array(run_scheduler(scheduler, total + 3))
    for group, max_lr in enumerate((lr0, lr1)):
        expected = reference_lr(lambda p: uba_eta_reference(p, 1, 1.0, 0.0, phi), np.arange(total + 4), total,
                                warmup, max_lr, min_lr)
        np.testing.assert_allclose(got[:, group], expected, rtol=0, atol=TOL)
    assert got.min() == min_lr and np.all(got[total:] == min_lr)


def test_uba_with_phi_2_equals_torch_cosine_annealing():
    (lr0, lr1), min_lr = random_groups()
    total = rand_int(50, 1000)
    ours = run_scheduler(UBA(two_group_optimizer((lr0, lr1)), total, phi=2.0, min_lr=min_lr), total)
    torchs = run_scheduler(CosineAnnealingLR(two_group_optimizer((lr0, lr1)), T_max=total, eta_min=min_lr), total)
    np.testing.assert_allclose(ours, torchs, rtol=0, atol=TOL)


def test_get_uba_schedule_with_phi_2_equals_transformers_cosine_with_warmup():
    transformers = pytest.importorskip("transformers")
    total = rand_int(50, 500)
    warmup = rand_int(1, total // 4)
    ours = get_uba_schedule(two_group_optimizer((0.1, 0.02)), total, num_warmup_steps=warmup, phi=2.0)
    hf = transformers.get_cosine_schedule_with_warmup(two_group_optimizer((0.1, 0.02)), warmup, total)
    np.testing.assert_allclose(run_scheduler(ours, total), run_scheduler(hf, total), rtol=0, atol=TOL)


def test_uba_scheduler_rejects_min_lr_above_a_group_lr():
    with pytest.raises(ValueError, match=r"^min_lr: expected <= max_lr of every param group.*param_groups\[1\]"):
        UBA(two_group_optimizer((0.1, 0.01)), 100, min_lr=0.05)


@pytest.mark.parametrize("kwargs,argument", [
    ({"phi": 0.0}, "phi"), ({"phi": math.nan}, "phi"), ({"total_steps": 0}, "total_steps"),
    ({"warmup_steps": 100}, "warmup_steps"), ({"warmup_steps": -2}, "warmup_steps"),
])
def test_uba_scheduler_rejects_bad_arguments(kwargs, argument):
    arguments = {"total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=f"^{argument}: expected"):
        UBA(two_group_optimizer((0.1, 0.01)), **arguments)


# ---- every schedule: by name, state_dict, bad arguments ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_resumed_scheduler_continues_identically(name):
    total = rand_int(40, 120)
    warmup, stop = rand_int(1, total // 3), rand_int(1, total)
    kwargs = {"min_lr": 1e-3, "warmup_steps": warmup} | ({"phi": rand_uniform(0.2, 8.0)} if name == "uba" else {})
    original = make_schedule(name, two_group_optimizer((0.1, 0.02)), total, **kwargs)
    run_scheduler(original, stop)
    buffer = io.BytesIO()
    torch.save({"optimizer": original.optimizer.state_dict(), "scheduler": original.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = make_schedule(name, two_group_optimizer((0.1, 0.02)), total, **kwargs)  # before the optimizer load
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert resumed.get_last_lr() == original.get_last_lr()
    assert run_scheduler(resumed, total - stop + 3) == run_scheduler(original, total - stop + 3)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_rejects_bad_budget_and_floor(name):
    optimizer = two_group_optimizer((0.1, 0.01))
    for kwargs, argument in [({"total_steps": 0}, "total_steps"), ({"total_steps": 50, "warmup_steps": 50},
                             "warmup_steps"), ({"total_steps": 50, "min_lr": 0.02}, "min_lr")]:
        with pytest.raises(ValueError, match=f"^{argument}: expected"):
            make_schedule(name, optimizer, **kwargs)


def test_make_schedule_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"^name: expected one of \['cosine', 'linear', 'onecycle', 'step', 'uba'"):
        make_schedule("exponential", two_group_optimizer((0.1, 0.01)), 100)


def test_lr_curve_covers_the_budget_and_ends_at_the_floor():
    total = rand_int(20, 200)
    for name in SCHEDULES:
        curve = lr_curve(name, total, max_lr=0.5, min_lr=0.01)
        assert len(curve) == total + 1 and max(curve) == pytest.approx(0.5, rel=1e-12) and min(curve) >= 0.01
        if name != "step":
            assert curve[-1] == 0.01


# ---- baselines against torch / transformers / numpy ---------------------------------------------------------------

def test_cosine_matches_torch_cosine_annealing():
    (lr0, lr1), min_lr = random_groups()
    total = rand_int(50, 1000)
    ours = make_schedule("cosine", two_group_optimizer((lr0, lr1)), total, min_lr=min_lr)
    torchs = CosineAnnealingLR(two_group_optimizer((lr0, lr1)), T_max=total, eta_min=min_lr)
    np.testing.assert_allclose(run_scheduler(ours, total), run_scheduler(torchs, total), rtol=0, atol=TOL)


def test_linear_matches_torch_linear_lr():
    total = rand_int(50, 1000)
    ours = make_schedule("linear", two_group_optimizer((0.3, 0.04)), total)
    torchs = LinearLR(two_group_optimizer((0.3, 0.04)), start_factor=1.0, end_factor=0.0, total_iters=total)
    np.testing.assert_allclose(run_scheduler(ours, total + 3), run_scheduler(torchs, total + 3), rtol=0, atol=TOL)


def test_step_matches_torch_multistep_lr():
    total = 4 * rand_int(10, 200)  # milestones at 50% and 75% fall on whole steps
    ours = make_schedule("step", two_group_optimizer((0.3, 0.04)), total)
    torchs = MultiStepLR(two_group_optimizer((0.3, 0.04)), milestones=[total // 2, 3 * total // 4], gamma=0.1)
    np.testing.assert_allclose(run_scheduler(ours, total + 3), run_scheduler(torchs, total + 3), rtol=0, atol=TOL)


def test_wsd_matches_transformers_wsd_with_linear_decay():
    transformers = pytest.importorskip("transformers")
    warmup, decay = rand_int(1, 50), rand_int(2, 60)
    total = warmup + 5 * decay  # 20% of the post-warm-up budget is a whole number of steps
    max_lr, min_lr = 0.2, rand_uniform(0.0, 0.1)
    ours = make_schedule("wsd", two_group_optimizer((max_lr, max_lr)), total, min_lr=min_lr, warmup_steps=warmup)
    hf = transformers.get_wsd_schedule(two_group_optimizer((max_lr, max_lr)), warmup, decay, num_training_steps=total,
                                       decay_type="linear", min_lr_ratio=min_lr / max_lr)
    np.testing.assert_allclose(run_scheduler(ours, total + 3), run_scheduler(hf, total + 3), rtol=0, atol=TOL)


def test_onecycle_matches_torch_onecycle_lr():
    total, max_lr = rand_int(20, 1000), rand_uniform(0.01, 1.0)
    warmup = rand_int(1, total - 1)
    min_lr = max_lr / 25 / 1e4  # torch's min_lr at its defaults div_factor=25, final_div_factor=1e4
    ours = make_schedule("onecycle", torch.optim.SGD([torch.randn(2, requires_grad=True)], lr=max_lr), total,
                         min_lr=min_lr, warmup_steps=warmup)
    torchs = OneCycleLR(torch.optim.SGD([torch.randn(2, requires_grad=True)], lr=max_lr), max_lr=max_lr,
                        total_steps=total, pct_start=(warmup + 1) / total, cycle_momentum=False)
    got = np.array(run_scheduler(ours, total - 1))
    np.testing.assert_allclose(got, run_scheduler(torchs, total - 1), rtol=0, atol=TOL)
    assert got[warmup, 0] == pytest.approx(max_lr, rel=1e-12)


def test_onecycle_floors_its_ramp_and_holds_min_lr_past_the_budget():
    total = rand_int(20, 200)
    curve = lr_curve("onecycle", total + 5, max_lr=1.0, min_lr=0.1)  # ramp would start at 1/25 < 0.1
    assert curve[0] == 0.1 and min(curve) == 0.1 and curve[total + 4:] == [0.1, 0.1]
    assert lr_curve("onecycle", total)[round(0.3 * total)] == pytest.approx(1.0, rel=1e-12)  # torch's 30% ramp


@pytest.mark.parametrize("name,factor", [
    ("cosine", lambda p: 0.5 * (1 + np.cos(np.pi * p))),
    ("linear", lambda p: 1 - p),
    ("step", lambda p: np.where(p >= 0.75, 0.01, np.where(p >= 0.5, 0.1, 1.0))),
    ("wsd", lambda p: np.minimum(1.0, (1 - p) / 0.2)),
])
def test_baseline_matches_formula_with_warmup_and_floor(name, factor):
    (lr0, lr1), min_lr = random_groups()
    total = rand_int(30, 500)
    warmup = rand_int(1, total // 3)
    got = np.array(run_scheduler(make_schedule(name, two_group_optimizer((lr0, lr1)), total, min_lr=min_lr,
                                               warmup_steps=warmup), total + 3))
    for group, max_lr in enumerate((lr0, lr1)):
        expected = reference_lr(factor, np.arange(total + 4), total, warmup, max_lr, min_lr)
        np.testing.assert_allclose(got[:, group], expected, rtol=0, atol=TOL)


# ---- CLI ---------------------------------------------------------------------------------------------------------

def test_schedules_plot_writes_png(tmp_path, capsys):
    out = tmp_path / "schedules.png"
    assert main(["schedules", "plot", "--total", "200", "--phi", "0.5", "2", "7", "--warmup", "20",
                 "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["schedules.png"]  # no temp file left behind


@pytest.mark.parametrize("argv,message", [
    (["--total", "0"], "expected an integer > 0"),
    (["--total", "1"], "--total: expected an integer >= 2"),
    (["--phi", "0"], "expected a finite number > 0"),
    (["--phi", "1", "nan"], "expected a finite number > 0"),
    (["--phi", "-2"], "expected a finite number > 0"),
    (["--warmup", "-1"], "expected an integer >= 0"),
    (["--total", "50", "--warmup", "50"], "--warmup: expected an integer < --total (50)"),
])
def test_schedules_plot_rejects_bad_flags(argv, message, tmp_path, capsys):
    assert main(["schedules", "plot", "-o", str(tmp_path / "x.png"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()

"""RateConstraint's update forms and λ schedules: mode "loss" and its alias "grad", include="all" pooling,
the GradScaler order, and lam_schedule with the ready-made schedules, each against independent formulas
(docs/backslash.md §3–§5)."""

import copy
import io
import math
import pickle

import pytest
import scipy.optimize
import scipy.special
import torch
from torch import nn

from slimrate.backslash import RateConstraint
from slimrate.backslash.lam_schedules import constant, linear_warmup, schedule_from_state, uba_shape
from slimrate.backslash.train_hook import RateConstraintHook

from helpers import rel_err


class Tiny(nn.Module):
    """Embedding, Linear with bias, LayerNorm: weights, biases, norm gains and an embedding."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.emb = nn.Embedding(11, 6, dtype=dtype)
        self.fc = nn.Linear(6, 5, dtype=dtype)
        self.norm = nn.LayerNorm(5, dtype=dtype)
        self.out = nn.Linear(5, 3, dtype=dtype)

    def forward(self, idx):
        return self.out(self.norm(torch.tanh(self.fc(self.emb(idx)))))


def rate_grads64(tensors, nu, eps):
    """λ-free ∂R/∂θ of R = (1/N)·Σ(|θ|+ε)^ν by float64 autograd (the oracle)."""
    xs = [t.detach().double().requires_grad_(True) for t in tensors]
    n = sum(x.numel() for x in xs)
    return torch.autograd.grad(sum(((x.abs() + eps) ** nu).sum() for x in xs) / n, xs)


def nu_by_scipy(tensors):
    """ν solving Γ(1/ν)Γ(3/ν)/Γ(2/ν)² = N·Σθ²/(Σ|θ|)² pooled over ``tensors`` (scipy root finding)."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    ratio = flat.numel() * flat.square().sum().item() / flat.abs().sum().item() ** 2
    gl = scipy.special.gammaln
    return scipy.optimize.brentq(lambda nu: gl(1 / nu) + gl(3 / nu) - 2 * gl(2 / nu) - math.log(ratio), 0.1, 3,
                                 xtol=1e-14)


def backward_once(model):
    model.zero_grad(set_to_none=True)
    model(torch.randint(0, 11, (4, 3))).square().mean().backward()


# ---- mode "loss" and its alias "grad" --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_loss_mode_and_grad_alias_add_lam_times_rate_gradient(mode):
    model = Tiny()
    backward_once(model)
    c = RateConstraint(model, lam=3.0, nu=0.7, mode=mode)
    assert c.mode == "loss" and c.state_dict()["mode"] == "loss"
    before = [p.grad.clone() for p in c.params]
    c.step()
    for p, g0, d in zip(c.params, before, rate_grads64(c.params, 0.7, 1.0), strict=True):
        assert rel_err(p.grad - g0, 3.0 * d) < 1e-12


def test_state_dict_saved_with_mode_grad_loads_as_loss():
    model = Tiny()
    old = RateConstraint(model, lam=2.0, mode="decoupled").state_dict()
    for key in ("lam_schedule", "last_lam"):  # an earlier version's state has neither
        del old[key]
    old["mode"] = "grad"
    c = RateConstraint(model, lam=1.0, mode="decoupled")
    c.load_state_dict(old)
    assert c.mode == "loss" and c.lam == 2.0 and c.lam_schedule is None and math.isnan(c.last_lam)


# ---- include="all": ν and N pooled over every float parameter --------------------------------------

def test_include_all_pools_nu_and_n_over_biases_norms_and_embeddings():
    model = Tiny()
    with torch.no_grad():
        model.emb.weight.normal_(0.0, 0.05)  # trained-looking weights next to norm gains near 1
        model.norm.weight.normal_(1.0, 0.1)  # LayerNorm starts at exactly 1 and 0
        model.norm.bias.normal_(0.0, 0.1)
    backward_once(model)
    every = list(model.parameters())
    c = RateConstraint(model, lam=2.0, include="all")
    assert c.param_names == ["emb.weight", "fc.weight", "fc.bias", "norm.weight", "norm.bias", "out.weight",
                             "out.bias"]
    assert c.num_params == sum(p.numel() for p in every)
    assert c.nu == pytest.approx(nu_by_scipy(every), rel=1e-9)
    weights_only = RateConstraint(model, lam=2.0)
    assert abs(weights_only.nu - c.nu) > 0.1, "the pools differ: norm gains near 1 make 'all' heavy-tailed"
    before = [p.grad.clone() for p in every]
    c.step()
    for p, g0, d in zip(every, before, rate_grads64(every, c.nu, 1.0), strict=True):
        assert rel_err(p.grad - g0, 2.0 * d) < 1e-12


# ---- GradScaler -------------------------------------------------------------------------------------

LAM, LR, NU, SCALE = 0.5, 0.1, 0.8, 2.0 ** 20


def scaled_sgd_step(model, x, y, constraint, *, order):
    """One SGD step under a GradScaler with a large scale; returns the rate term found in the gradients.
    order "documented": unscale_, then constraint.step(); "early": constraint.step() before unscale_."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler.scale((model(x) - y).square().mean()).backward()
    if order == "early":
        constraint.step()
    scaler.unscale_(optimizer)
    task = [p.grad.clone() for p in constraint.params]
    if order == "documented":
        constraint.step()
    applied = [p.grad - t for p, t in zip(constraint.params, task, strict=True)]
    scaler.step(optimizer)
    scaler.update()
    return applied


def test_documented_gradscaler_order_applies_the_unscaled_rate_term():
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))
    reference, twin = copy.deepcopy(model).double(), copy.deepcopy(model)
    weights = [m.weight for m in reference if isinstance(m, nn.Linear)]
    rate64 = [LAM * d for d in rate_grads64(weights, NU, 1.0)]
    reference.zero_grad()
    (reference(x.double()) - y.double()).square().mean().backward()
    expected = {id(w): w.detach() - LR * (w.grad + d) for w, d in zip(weights, rate64, strict=True)}

    c = RateConstraint(model, lam=LAM, nu=NU)
    applied = scaled_sgd_step(model, x, y, c, order="documented")
    for a, d in zip(applied, rate64, strict=True):
        assert rel_err(a, d) < 1e-6, "the rate term must not depend on the loss scale"
    for p, w in zip(c.params, weights, strict=True):
        assert rel_err(p.detach(), expected[id(w)]) < 1e-6  # the whole SGD step, against float64

    wrong = scaled_sgd_step(twin, x, y, RateConstraint(twin, lam=LAM, nu=NU), order="early")
    assert rel_err(wrong[0], rate64[0]) > 0.99, "stepping before unscale_ divides the rate term by the scale"


def test_scaler_argument_refuses_a_step_before_unscale():
    model = nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    c = RateConstraint(model, lam=LAM, scaler=scaler)
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    with pytest.raises(ValueError, match=r"has not unscaled.*scaler.unscale_\(optimizer\) before constraint.step"):
        c.step()
    assert c.steps == 0
    scaler.unscale_(optimizer)
    c.step()
    scaler.step(optimizer)
    scaler.update()
    with pytest.raises(ValueError, match="has not unscaled"):  # a new iteration: unscale_ again first
        c.step()


@pytest.mark.parametrize("kwargs,error,match", [
    ({"scaler": object()}, TypeError, "scaler: expected a torch.amp.GradScaler"),
    ({"scaler": torch.amp.GradScaler("cpu"), "mode": "decoupled"}, ValueError, "scaler: only checked in mode 'loss'"),
    ({"lam_schedule": 0.5}, TypeError, "lam_schedule: expected None or a callable"),
])
def test_constraint_rejects_bad_scaler_and_schedule(kwargs, error, match):
    with pytest.raises(error, match=match):
        RateConstraint(nn.Linear(4, 2), lam=1.0, **kwargs)


# ---- λ schedules ------------------------------------------------------------------------------------

def uba_formula(k, total, phi, warmup):
    """UBA's shape with peak 1, written out: linear warm-up, then s/(φ/2 + (1 − φ/2)s), s = (1 + cos πp)/2."""
    if k < warmup:
        return k / warmup
    s = 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / (total - warmup))))
    return s / (phi / 2 + (1 - phi / 2) * s)


@pytest.mark.parametrize("schedule,formula", [
    (constant(), lambda k: 1.0),
    (linear_warmup(7), lambda k: min(1.0, k / 7)),
    (linear_warmup(0), lambda k: 1.0),
    (uba_shape(20, 2.0), lambda k: 0.5 * (1 + math.cos(math.pi * min(k, 20) / 20))),  # φ = 2: cosine
    (uba_shape(23, 0.7, warmup_steps=4), lambda k: uba_formula(k, 23, 0.7, 4)),
    (uba_shape(23, 5.0, warmup_steps=1), lambda k: uba_formula(k, 23, 5.0, 1)),
], ids=["constant", "warmup7", "warmup0", "uba-cosine", "uba-phi0.7", "uba-phi5"])
def test_schedules_match_their_formulas_and_round_trip(schedule, formula):
    for k in range(30):
        assert schedule(k) == pytest.approx(formula(k), rel=1e-12, abs=1e-15), k
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    assert schedule_from_state(schedule.state_dict()) == schedule


def test_constraint_applies_lam_times_schedule_at_its_own_step_count():
    w = torch.randn(40, 3, dtype=torch.float64)
    c = RateConstraint([w], lam=5.0, nu=1.0, mode="decoupled", lam_schedule=linear_warmup(4))
    hook = RateConstraintHook(c)
    for k in range(6):
        before = w.clone()
        c.step()
        lam = 5.0 * min(1.0, k / 4)
        assert c.last_lam == lam and hook.metrics()["backslash_lam"] == lam
        assert rel_err(before - w, lam * rate_grads64([before], 1.0, 1.0)[0]) < 1e-12 if lam else torch.equal(w, before)


def test_state_dict_saves_ready_made_schedules_and_asks_for_plain_callables():
    model = Tiny()
    c = RateConstraint(model, lam=2.0, mode="decoupled", lam_schedule=uba_shape(10, 3.0, 2))
    for _ in range(3):
        c.step()
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    twin = RateConstraint(copy.deepcopy(model), lam=1.0, mode="decoupled")
    twin.load_state_dict(torch.load(buffer))
    assert twin.lam_schedule == uba_shape(10, 3.0, 2) and twin.current_lam() == c.current_lam()
    assert twin.state_dict() == c.state_dict()

    def halve(k):
        return 0.5

    custom = RateConstraint(model, lam=2.0, lam_schedule=halve)
    custom.step()
    state = custom.state_dict()
    assert state["lam_schedule"] == "callable" and state["last_lam"] == 1.0
    with pytest.raises(ValueError, match=r"plain-callable lam_schedule.*lam_schedule=<the same callable>"):
        RateConstraint(model, lam=2.0).load_state_dict(state)
    again = RateConstraint(model, lam=2.0, lam_schedule=halve)
    again.load_state_dict(state)
    assert again.lam_schedule is halve and again.steps == 1


@pytest.mark.parametrize("make,error,match", [
    (lambda: linear_warmup(-1), ValueError, "warmup_steps: expected an integer >= 0"),
    (lambda: linear_warmup(2.5), ValueError, "warmup_steps: expected an integer >= 0"),
    (lambda: uba_shape(0, 2.0), ValueError, "total_steps: expected an integer > 0"),
    (lambda: uba_shape(10, 2.0, 10), ValueError, r"warmup_steps: expected an integer in \[0, total_steps=10\)"),
    (lambda: uba_shape(10, -1.0), ValueError, "phi: expected a finite number > 0"),
    (lambda: constant()(-1), ValueError, "step: expected an integer >= 0"),
    (lambda: schedule_from_state({"name": "cosine"}), ValueError, "lam_schedule: expected the state_dict"),
    (lambda: schedule_from_state({"name": "linear_warmup"}), ValueError, "does not match linear_warmup"),
])
def test_schedules_reject_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("factor", [-0.5, math.nan, math.inf, "1"])
def test_constraint_rejects_a_schedule_returning_a_bad_factor(factor):
    c = RateConstraint(nn.Linear(4, 2), lam=1.0, lam_schedule=lambda k: factor)
    with pytest.raises(ValueError, match="lam_schedule: returned .* at step 0; expected a finite number >= 0"):
        c.step()
    assert c.steps == 0

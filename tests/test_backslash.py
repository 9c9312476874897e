"""BackSlash training API: shape estimation, the differentiable rate, RateConstraint and its Trainer
callback, each checked against plain float64 autograd on R(θ) = (1/N)·Σ(|θ|+ε)^ν (docs/backslash.md §2)."""

import copy
import io
import math
import subprocess
import sys

import pytest
import scipy.special
import torch
from torch import nn

from slimrate.backslash import RateConstraint, estimate_shape, rate, shape_from_moments

# float64 throughout: R and ∂R/∂θ are computed in float64 by the op and by autograd; they differ only
# in summation order and pow's rounding, a few ulps of float64.
RTOL64 = 1e-12


# ---- helpers ---------------------------------------------------------------------------------------

def gg_samples(nu: float, n: int, scale: float = 0.02) -> torch.Tensor:
    """n generalized-Gaussian GG(ν, α) samples, θ = α·G^(1/ν)·s (G ~ Gamma(1/ν, 1), s a random sign)."""
    g = torch.distributions.Gamma(torch.tensor(1.0 / nu, dtype=torch.float64), 1.0).sample((n,))
    s = torch.randint(0, 2, (n,), dtype=torch.float64) * 2 - 1
    return scale * g ** (1.0 / nu) * s


def away_from_zero(shape, scale=0.3, dtype=torch.float64) -> torch.Tensor:
    """Random values with |θ| ≥ 1e-2·scale, so |θ| is smooth where finite differences probe it."""
    x = torch.randn(shape, dtype=torch.float64)
    return (torch.sign(x) * (x.abs() + 1e-2) * scale).to(dtype)


def formula_rate_and_grads(tensors, nus, eps):
    """R = (1/N)·Σ_t Σ (|θ|+ε)^ν_t and its gradient, by plain float64 autograd (the test's oracle)."""
    xs = [t.detach().double().requires_grad_(True) for t in tensors]
    n = sum(x.numel() for x in xs)
    r = sum(((x.abs() + eps) ** nu).sum() for x, nu in zip(xs, nus, strict=True)) / n
    grads = torch.autograd.grad(r, xs)
    return r.detach(), grads


def small_model(dtype=torch.float64) -> nn.Module:
    """Embedding → Linear → LayerNorm → Conv1d → Linear: weights to constrain, biases and norms not."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.fc1 = nn.Linear(6, 9)
            self.norm = nn.LayerNorm(9)
            self.conv = nn.Conv1d(1, 2, 3)
            self.fc2 = nn.Linear(14, 3)

        def forward(self, idx):
            h = self.norm(torch.relu(self.fc1(self.emb(idx))))  # (B, 9)
            return self.fc2(self.conv(h[:, None, :]).flatten(1))  # (B, 2, 7) → (B, 14) → (B, 3)

    return Net().to(dtype)


def weights_of(model):
    return [model.emb.weight, model.fc1.weight, model.conv.weight, model.fc2.weight]


def others_of(model):
    return [model.fc1.bias, model.norm.weight, model.norm.bias, model.conv.bias, model.fc2.bias]


def backward_once(model):
    idx = torch.randint(0, 11, (5,))
    model.zero_grad(set_to_none=True)
    model(idx).square().mean().backward()


# ---- estimate_shape / shape_from_moments -----------------------------------------------------------

@pytest.mark.parametrize("nu", [0.5, 1.0, 2.0])
def test_estimate_shape_recovers_generalized_gaussian_shape(nu):
    theta = gg_samples(nu, 10**6)
    # Pooled over tensors of different shapes and dtypes, as over a model's layers.
    tensors = [theta[:300_000].reshape(600, 500), theta[300_000:].float()]
    got = estimate_shape(tensors)
    assert abs(got - nu) / nu < 0.05, f"ν̂ = {got}, true ν = {nu}"


@pytest.mark.parametrize("nu", [0.15, 0.3, 0.7, 1.3, 2.5, 2.95])
def test_shape_from_moments_inverts_scipy_gamma_ratio(nu):
    rho = scipy.special.gamma(1 / nu) * scipy.special.gamma(3 / nu) / scipy.special.gamma(2 / nu) ** 2
    n, sum_abs = 1000.0, 431.0
    sum_sq = rho * sum_abs**2 / n  # so that n·Σθ²/(Σ|θ|)² = ρ(ν)
    assert shape_from_moments(n, sum_abs, sum_sq) == pytest.approx(nu, rel=1e-9)


def test_shape_range_ends_and_closed_forms_match_documented_ratios():
    def rho(nu):
        return scipy.special.gamma(1 / nu) * scipy.special.gamma(3 / nu) / scipy.special.gamma(2 / nu) ** 2

    assert rho(0.1) == pytest.approx(216.8, abs=0.05)
    assert rho(3.0) == pytest.approx(1.461, abs=5e-4)
    # ρ(1) = 2 (Laplace) and ρ(2) = π/2 (Gaussian), docs/backslash.md §3.
    assert shape_from_moments(4.0, 2.0, 2.0) == pytest.approx(1.0, rel=1e-12)
    assert shape_from_moments(1.0, 1.0, math.pi / 2) == pytest.approx(2.0, rel=1e-12)


def test_shape_clamps_at_both_ends():
    assert shape_from_moments(1.0, 1.0, 1e4) == 0.1  # ρ̂ = 10⁴ > ρ(0.1)
    assert shape_from_moments(10.0, 10.0, 10.0) == 3.0  # ρ̂ = 1 < ρ(3): all |θ| equal
    sparse = torch.zeros(10_000, dtype=torch.float64)
    sparse[torch.randint(0, 10_000, (3,))] = torch.randn(3, dtype=torch.float64).abs() + 1  # ρ̂ ≳ 3000
    assert estimate_shape([sparse]) == 0.1
    signs = torch.randint(0, 2, (999,), dtype=torch.float32) * 2 - 1  # ±c: ρ̂ = 1
    assert estimate_shape([signs * 0.37]) == 3.0


@pytest.mark.parametrize("tensors,match", [
    ([], "no elements"),
    ([torch.empty(0, 4)], "no elements"),
    ([torch.zeros(3, 5), torch.zeros(7)], "all values are zero"),
    ([torch.tensor([1.0, float("nan")])], "NaN or Inf"),
])
def test_estimate_shape_rejects_undefined_input(tensors, match):
    with pytest.raises(ValueError, match=match):
        estimate_shape(tensors)


@pytest.mark.parametrize("args,error,match", [
    ((0, 0.0, 0.0), ValueError, "n:"),
    ((5, 0.0, 0.0), ValueError, "sum_abs: all values are zero"),
    ((-1, 1.0, 1.0), ValueError, "n: expected a value >= 0"),
    ((5, float("inf"), 1.0), ValueError, "sum_abs: expected a finite"),
    ((5, "1", 1.0), TypeError, "sum_abs"),
])
def test_shape_from_moments_rejects_bad_moments(args, error, match):
    with pytest.raises(error, match=match):
        shape_from_moments(*args)


# ---- rate ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nu,eps", [(0.6, 1.0), (1.0, 0.5), (1.7, 0.1), (2.5, 0.0)])
def test_rate_passes_gradcheck(nu, eps):
    tensors = [away_from_zero(s).requires_grad_(True) for s in [(3, 5), (7,), (1,)]]
    assert torch.autograd.gradcheck(lambda *ts: rate(ts, nu, eps), tensors, eps=1e-6, atol=1e-9)


@pytest.mark.parametrize("nu,eps", [(0.45, 1.0), (1.3, 0.2)])
def test_rate_value_and_grads_match_formula_autograd(nu, eps):
    tensors = [(torch.randn(s, dtype=torch.float64) * 0.1).requires_grad_(True) for s in [(5, 123), (127,)]]
    r = rate(iter(tensors), nu, eps)  # a generator is accepted
    r.backward()
    r_ref, grads_ref = formula_rate_and_grads(tensors, [nu, nu], eps)
    assert r.dtype == torch.float64 and r.shape == ()
    torch.testing.assert_close(r.detach(), r_ref, rtol=RTOL64, atol=0)
    for t, g in zip(tensors, grads_ref, strict=True):
        torch.testing.assert_close(t.grad, g, rtol=RTOL64, atol=1e-300)


def test_rate_gradient_keeps_each_tensors_dtype_and_scales_with_upstream():
    a = (torch.randn(4, 9) * 0.1).requires_grad_(True)  # float32
    b = (torch.randn(6, dtype=torch.float64) * 0.1).requires_grad_(True)
    loss = torch.randn(()) ** 2 + 0.0 * a.sum()  # a float32 task loss
    lam = 3.5
    (loss + lam * rate([a, b], 0.8)).backward()
    _, (ga, gb) = formula_rate_and_grads([a, b], [0.8, 0.8], 1.0)
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float64
    torch.testing.assert_close(a.grad, (lam * ga).float(), rtol=1e-6, atol=0)  # one float32 rounding
    torch.testing.assert_close(b.grad, lam * gb, rtol=RTOL64, atol=0)


def test_rate_is_not_twice_differentiable():
    t = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = rate([t], 1.2) + t.square().sum()  # a term with a real Hessian does not hide R's
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(loss, t, create_graph=True)


@pytest.mark.parametrize("tensors,nu,eps,error,match", [
    ([torch.randn(3)], 0.0, 1.0, ValueError, "nu: expected a value > 0"),
    ([torch.randn(3)], 1.0, -1.0, ValueError, "eps: expected a value >= 0"),
    (torch.randn(3), 1.0, 1.0, TypeError, "wrap a single tensor"),
    ([torch.arange(3)], 1.0, 1.0, TypeError, r"tensors\[0\]: expected a float dtype"),
])
def test_rate_rejects_bad_arguments(tensors, nu, eps, error, match):
    with pytest.raises(error, match=match):
        rate(tensors, nu, eps)


# ---- RateConstraint: parameter selection -----------------------------------------------------------

def test_constraint_selects_layer_weights_by_default():
    model = small_model()
    c = RateConstraint(model, lam=1.0)
    assert c.param_names == ["emb.weight", "fc1.weight", "conv.weight", "fc2.weight"]
    assert [id(p) for p in c.params] == [id(p) for p in weights_of(model)]
    assert c.num_params == sum(p.numel() for p in weights_of(model))


def test_constraint_include_all_callable_and_frozen_and_tied():
    model = small_model()
    assert RateConstraint(model, 1.0, include="all").num_params == sum(p.numel() for p in model.parameters())
    only_fc = RateConstraint(model, 1.0, include=lambda name, module, p: isinstance(module, nn.Linear))
    assert only_fc.param_names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    model.fc1.weight.requires_grad_(False)
    assert "fc1.weight" not in RateConstraint(model, 1.0).param_names
    tied = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    tied[1].weight = tied[0].weight
    assert RateConstraint(tied, 1.0).num_params == 28
    assert RateConstraint([tied[0].weight, tied[1].weight], 1.0).num_params == 28


# ---- RateConstraint: mode "loss" -------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.37, 250.0])
def test_grad_mode_adds_lam_times_rate_gradient_to_grads(lam):
    model = small_model()
    backward_once(model)
    weights = weights_of(model)
    grads0 = [p.grad.clone() for p in weights]
    others0 = [p.grad.clone() for p in others_of(model)]
    c = RateConstraint(model, lam=lam, eps=1.0)
    nu = estimate_shape(weights)
    r = c.step()
    r_ref, dr = formula_rate_and_grads(weights, [nu] * 4, 1.0)
    assert c.nu == nu and c.steps == 1
    assert r == c.last_rate and r == pytest.approx(r_ref.item(), rel=RTOL64)
    for p, g0, d in zip(weights, grads0, dr, strict=True):
        torch.testing.assert_close(p.grad, g0 + lam * d, rtol=RTOL64, atol=1e-15)
    for p, g0 in zip(others_of(model), others0, strict=True):
        assert torch.equal(p.grad, g0), "biases and norm parameters must be untouched"


def test_grad_mode_creates_missing_grads():
    model = small_model()
    c = RateConstraint(model, lam=2.0, nu=0.8)
    c.step()
    _, dr = formula_rate_and_grads(weights_of(model), [0.8] * 4, 1.0)
    for p, d in zip(weights_of(model), dr, strict=True):
        torch.testing.assert_close(p.grad, 2.0 * d, rtol=RTOL64, atol=0)
    assert all(p.grad is None for p in others_of(model))


def test_grad_mode_rejects_sparse_gradients():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 4])).sum().backward()
    with pytest.raises(ValueError, match="weight: its gradient is torch.sparse_coo"):
        RateConstraint(emb, lam=1.0).step()


# ---- RateConstraint: mode "decoupled" --------------------------------------------------------------

def test_decoupled_mode_shrinks_weights_by_lam_times_rate_gradient():
    model = small_model()
    before = [p.detach().clone() for p in weights_of(model)]
    others = [p.detach().clone() for p in others_of(model)]
    lam = 40.0
    c = RateConstraint(model, lam=lam, mode="decoupled")
    nu = estimate_shape(before)
    r = c.step()
    r_ref, dr = formula_rate_and_grads(before, [nu] * 4, 1.0)
    assert r == pytest.approx(r_ref.item(), rel=RTOL64)  # R of the weights before the update
    for p, b, d in zip(weights_of(model), before, dr, strict=True):
        torch.testing.assert_close(p.detach(), b - lam * d, rtol=RTOL64, atol=1e-15)
        assert not torch.equal(p.detach(), b)
    for p, o in zip(others_of(model), others, strict=True):
        assert torch.equal(p.detach(), o)
    assert all(p.grad is None for p in model.parameters()), "decoupled mode does not touch grads"


# ---- RateConstraint: ν -----------------------------------------------------------------------------

def test_fixed_nu_is_kept_and_auto_nu_follows_the_weights():
    w = nn.Parameter(gg_samples(0.6, 20_000))
    fixed = RateConstraint([w], lam=1.0, nu=1.25, mode="decoupled")
    auto = RateConstraint([w], lam=1.0, nu="auto", mode="decoupled")
    for _ in range(2):
        fixed.step()
        assert fixed.nu == 1.25
    with torch.no_grad():
        w.copy_(gg_samples(1.8, 20_000))
    expected = estimate_shape([w])
    auto.step()
    assert auto.nu == expected  # estimated before this step's update
    assert abs(auto.nu - 1.8) / 1.8 < 0.1


def test_shape_every_reestimates_only_every_k_steps():
    w = nn.Parameter(gg_samples(0.5, 20_000))
    c = RateConstraint([w], lam=0.0, mode="decoupled", shape_every=3)
    seen = []
    for step in range(7):
        if step in (1, 4):  # change the weights' shape right after an estimate
            with torch.no_grad():
                w.copy_(gg_samples(2.0 if step == 1 else 0.5, 20_000))
        c.step()
        seen.append(c.nu)
    assert seen[0] == seen[1] == seen[2] and seen[0] < 0.6  # estimated at step 0 only
    assert seen[3] == seen[4] == seen[5] and seen[3] > 1.8  # re-estimated at step 3
    assert seen[6] < 0.6  # and at step 6


def test_tensor_scope_uses_per_tensor_shape_with_global_n():
    a = nn.Parameter(gg_samples(0.5, 2000).reshape(20, 100))
    b = nn.Parameter(gg_samples(2.0, 1000, scale=0.2))
    a.grad, b.grad = torch.randn_like(a) * 1e-3, torch.randn_like(b) * 1e-3
    grads0 = [a.grad.clone(), b.grad.clone()]
    lam = 500.0
    c = RateConstraint([a, b], lam=lam, shape_scope="tensor")
    nus = [estimate_shape([a]), estimate_shape([b])]
    assert nus[0] < 0.6 and nus[1] > 1.8
    r = c.step()
    assert c.nu_per_tensor == nus
    assert c.nu == pytest.approx((2 * nus[0] + nus[1]) / 3)  # weighted by numel
    r_ref, dr = formula_rate_and_grads([a, b], nus, 1.0)
    assert r == pytest.approx(r_ref.item(), rel=RTOL64)
    for p, g0, d in zip([a, b], grads0, dr, strict=True):
        torch.testing.assert_close(p.grad, g0 + lam * d, rtol=RTOL64, atol=1e-15)
    pooled = RateConstraint([a, b], lam=1.0)  # shape_scope="global" pools both tensors
    assert pooled.nu == estimate_shape([a, b]) and min(abs(pooled.nu - nu) for nu in nus) > 0.1


def test_all_zero_tensor_keeps_its_nu_and_gets_no_gradient():
    z = nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    w = nn.Parameter(torch.randn(50, dtype=torch.float64))
    c = RateConstraint([z, w], lam=3.0, shape_scope="tensor")
    c.step()
    assert c.nu_per_tensor[0] == 2.0 and torch.equal(z.grad, torch.zeros_like(z))


# ---- RateConstraint: state_dict and bad arguments --------------------------------------------------

def test_state_dict_round_trip_restores_settings_and_progress():
    model = small_model()
    c = RateConstraint(model, lam=12.0, eps=0.5, nu="auto", mode="decoupled", shape_every=2,
                       shape_scope="tensor")
    for _ in range(3):
        c.step()
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    twin_model = copy.deepcopy(model)
    twin = RateConstraint(twin_model, lam=1.0, eps=1.0, nu=1.1, mode="grad", shape_every=5)
    twin.load_state_dict(torch.load(buffer))
    assert twin.state_dict() == c.state_dict()
    assert (twin.lam, twin.eps, twin.mode, twin.steps, twin.shape_every) == (12.0, 0.5, "decoupled", 3, 2)
    # Step 3 is not a re-estimation step (shape_every = 2): both must use the restored ν.
    assert twin.step() == c.step()
    for p, q in zip(twin_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_other_parameters_and_missing_keys():
    state = RateConstraint(small_model(), lam=1.0).state_dict()
    with pytest.raises(ValueError, match="over the same parameters"):
        RateConstraint(nn.Linear(3, 3), lam=1.0).load_state_dict(state)
    del state["mode"]
    with pytest.raises(ValueError, match=r"missing keys \['mode'\]"):
        RateConstraint(small_model(), lam=1.0).load_state_dict(state)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"lam": -1.0}, ValueError, "lam: expected a value >= 0"),
    ({"lam": "1"}, TypeError, "lam: expected a Python number"),
    ({"lam": float("nan")}, ValueError, "lam: expected a finite"),
    ({"eps": -0.1}, ValueError, "eps: expected a value >= 0"),
    ({"nu": 0.0}, ValueError, "nu: expected a value > 0"),
    ({"nu": -2.0}, ValueError, "nu: expected a value > 0"),
    ({"nu": "fixed"}, ValueError, "nu: expected 'auto' or a number"),
    ({"mode": "gradient"}, ValueError, "mode: expected one of"),
    ({"shape_every": 0}, ValueError, "shape_every: expected an int >= 1"),
    ({"shape_every": 1.5}, TypeError, "shape_every: expected an int"),
    ({"shape_scope": "layer"}, ValueError, "shape_scope: expected one of"),
    ({"include": "biases"}, ValueError, "include: expected one of"),
])
def test_constraint_rejects_bad_arguments(kwargs, error, match):
    args = {"lam": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        RateConstraint(small_model(), **args)


@pytest.mark.parametrize("target,kwargs,error,match", [
    (nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), {}, ValueError, "no parameters to constrain"),
    ([], {}, ValueError, "no parameters to constrain"),
    (torch.randn(3), {}, TypeError, "module_or_params: expected an nn.Module"),
    (3, {}, TypeError, "module_or_params: expected an nn.Module"),
    ([torch.arange(4)], {}, TypeError, "expected a float dtype"),
    ([torch.randn(3)], {"include": "all"}, ValueError, "include: only applies to a module"),
])
def test_constraint_rejects_bad_parameter_sets(target, kwargs, error, match):
    with pytest.raises(error, match=match):
        RateConstraint(target, 1.0, **kwargs)


# ---- convergence on a tiny model -------------------------------------------------------------------

def train_tiny_mlp(constraint_kwargs=None, steps=40):
    """Adam on a 2-layer MLP regression from a fixed seed; returns (losses, model)."""
    torch.manual_seed(1234)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    c = RateConstraint(model, **constraint_kwargs) if constraint_kwargs is not None else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        if c is not None and c.mode == "loss":
            c.step()
        opt.step()
        if c is not None and c.mode == "decoupled":
            c.step()
        losses.append(loss.detach())
    return torch.stack(losses), model


@pytest.mark.parametrize("mode", ["loss", "grad", "decoupled"])
def test_lam_zero_training_matches_plain_training_at_every_step(mode):
    plain, plain_model = train_tiny_mlp()
    zero, zero_model = train_tiny_mlp({"lam": 0.0, "mode": mode})
    assert torch.equal(plain, zero), f"first differing step: {int((plain != zero).nonzero()[0])}"
    for p, q in zip(plain_model.parameters(), zero_model.parameters(), strict=True):
        assert torch.equal(p, q)


# λ where the rate term is felt but the task still trains (scanned 0.1–300 here; larger λ freezes the
# loss: with Adam, grad mode's λ·ν/N term dominates once λ ≳ 1 for N = 288).
@pytest.mark.parametrize("mode,lam", [("loss", 0.1), ("decoupled", 0.2)])
def test_rate_constraint_lowers_the_rate(mode, lam):
    plain, plain_model = train_tiny_mlp()
    constrained, model = train_tiny_mlp({"lam": lam, "mode": mode})
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    plain_weights = [m.weight for m in plain_model if isinstance(m, nn.Linear)]
    nu = estimate_shape(plain_weights)  # judge both at one ν
    r_plain = rate(plain_weights, nu).item()
    r_constrained = rate(weights, nu).item()
    assert r_constrained < r_plain, f"R with λ={lam}: {r_constrained}, without: {r_plain}"
    assert constrained[-1] < 0.5 * constrained[0], "the task loss must still fall"


# ---- transformers Trainer callback -----------------------------------------------------------------

def train_tiny_bert(tmp_path, constraint_kwargs=None, max_steps=5):
    """5 Trainer steps of a 2-layer tiny BERT classifier (no dropout: runs are deterministic)."""
    transformers = pytest.importorskip("transformers")
    from slimrate.backslash import RateConstraintCallback

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(7)
    data = [{"input_ids": torch.randint(0, 64, (8,), generator=g),
             "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.randint(0, 2, (), generator=g)} for _ in range(16)]
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps,
                                          per_device_train_batch_size=4, use_cpu=True, report_to=[],
                                          save_strategy="no", logging_steps=1, learning_rate=1e-3,
                                          disable_tqdm=True, seed=0)
    constraint, callbacks = None, None
    if constraint_kwargs is not None:
        constraint = RateConstraint(model, **constraint_kwargs)
        callbacks = [RateConstraintCallback(constraint)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return model, constraint, trainer.state.log_history


@pytest.mark.parametrize("mode,lam", [("loss", 100.0), ("decoupled", 50.0)])
def test_trainer_callback_applies_constraint_each_step(tmp_path, mode, lam):
    plain, _, _ = train_tiny_bert(tmp_path)
    control, control_c, _ = train_tiny_bert(tmp_path, {"lam": 0.0, "mode": mode})
    model, constraint, logs = train_tiny_bert(tmp_path, {"lam": lam, "mode": mode})
    assert control_c.steps == 5 and constraint.steps == 5
    plain_sd, control_sd, sd = plain.state_dict(), control.state_dict(), model.state_dict()
    assert all(torch.equal(plain_sd[k], control_sd[k]) for k in plain_sd), "λ = 0 must not change training"
    changed = [k for k in plain_sd if not torch.equal(plain_sd[k], sd[k])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in changed
    assert "bert.embeddings.word_embeddings.weight" in changed
    step_logs = [entry for entry in logs if "loss" in entry]
    assert len(step_logs) == 5 and all({"backslash_rate", "backslash_nu", "backslash_lam"} <= set(e) for e in step_logs)
    assert step_logs[-1]["backslash_lam"] == lam
    assert step_logs[-1]["backslash_rate"] == constraint.last_rate


def test_callback_rejects_non_constraint():
    pytest.importorskip("transformers")
    from slimrate.backslash import RateConstraintCallback

    with pytest.raises(TypeError, match="constraint: expected a RateConstraint"):
        RateConstraintCallback(object())


def test_callback_rejects_a_model_whose_parameters_were_replaced():
    pytest.importorskip("transformers")
    from slimrate.backslash import RateConstraintCallback

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    callback = RateConstraintCallback(RateConstraint(model, lam=1.0))
    callback.on_train_begin(None, None, None, model=model)  # the same parameters: accepted
    model[1].weight = nn.Parameter(model[1].weight.detach().clone())  # as a wrapper that re-creates them
    with pytest.raises(ValueError, match=r"constraint: 1.weight and 0 more of its 2 parameters are no longer"):
        callback.on_train_begin(None, None, None, model=model)


def test_importing_slimrate_backslash_does_not_import_transformers():
    code = "import sys, slimrate.backslash; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

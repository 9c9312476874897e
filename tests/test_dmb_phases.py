"""DMB's two training schedules (interleaved, official) and its two matrix objectives (prior, bound): phase counts,
the official p̂_0, the bound's rate gradient against an exact float64 computation, settings checks, resume."""

import contextlib
import copy
import dataclasses
import itertools
import json

import pytest
import torch
from test_dmb_train import Crash, crash_score_batches_at

from slimrate.dmb import DMBConfig, load_model, load_token_data, train_dmb
from slimrate.dmb.driver import DMBModel, build_model
from slimrate.dmb.losses import matrix_bound_loss
from slimrate.dmb.noise import LogLinearNoise
from slimrate.dmb.outer_loop import OuterLoop
from slimrate.dmb.rate_matrix import RateMatrix
from slimrate.ops import backend as backends

TINY = {"model": "tiny", "seq_len": 16, "batch": 8, "eval_sequences": 4, "eval_samples": 2, "p0_samples": 4,
        "p0_steps": 3, "log_every": 1, "progress": False}


class CouplingNet:
    """A fixed log-score (B, L, V) float64 that depends on the whole x_t (so the DWDSE does not factor over
    positions), standing in for the frozen score network."""

    def __init__(self, L: int, V: int) -> None:
        self.table = torch.randn(L, V, V, dtype=torch.float64)
        self.coupling = torch.randn(L, V, dtype=torch.float64)

    def __call__(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        L = x_t.shape[1]
        own = self.table[torch.arange(L), x_t]  # (B, L, V)
        return own + 0.3 * x_t.sum(-1).double()[:, None, None] * self.coupling


def dense_q(rates: RateMatrix) -> torch.Tensor:
    """Q (L, V, V) built entry by entry from its definition: Q[x, y] = a_{rank(y)−1} if rank(y) > rank(x)."""
    L, V = rates.perm.shape
    into = torch.cat([torch.zeros(L, 1, dtype=torch.float64), rates.rates()], 1).gather(1, rates.perm)  # (L, V)
    up = rates.perm[:, None, :] > rates.perm[:, :, None]  # (L, x, y)
    off = torch.where(up, into[:, None, :].expand(L, V, V), 0.0)
    return off - torch.diag_embed(off.sum(-1))


def safe_xlogx_ratio(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p·log(p/q) with 0 where p = 0, without NaN in the gradient."""
    live = p > 0
    return torch.where(live, p * (torch.log(torch.where(live, p, 1.0)) - torch.log(q.clamp_min(1e-300))), 0.0)


def exact_bound(rates, net, noise, x0, t, mu_hat, p0_hat, h_T, pathwise_only=False) -> torch.Tensor:
    """E_{x_t} DWDSE(x0, t) + Σ_l Σ_v μ̂[l, v]·KL(exp(h_T Q)[v] ‖ p̂_0 exp(h_T Q)), enumerating every x_t ∈ V^L,
    from dense matrix exponentials (float64).  pathwise_only: hold p(x_t|x0) fixed (the biased gradient)."""
    Q = dense_q(rates)
    L, V = mu_hat.shape
    h, sigma = noise.total(t), noise.rate(t)
    P = torch.linalg.matrix_exp(h * Q)  # (L, V, V)
    pos = torch.arange(L)
    score = torch.zeros((), dtype=torch.float64)
    for states in itertools.product(range(V), repeat=L):
        x_t = torch.tensor(states)
        if (rates.perm[pos, x_t] < rates.perm[pos, x0]).any():
            continue  # unreachable: p(x_t|x0) = 0 (nothing moves to a lower rank)
        p_xt = P[pos, x0, x_t].prod()
        s = net(x_t[None], h.expand(1))[0]  # (L, V)
        r_num, r_den = P[pos, x0], P[pos, x0, x_t][:, None]  # p(y|x0), p(x_t|x0)
        rank_y, rank_xt = rates.perm, rates.perm[pos, x_t][:, None]
        w = sigma * Q[pos, :, x_t] * (rank_y < rank_xt)  # σ·Q[y, x_t], y ≠ x_t
        r = r_num / r_den
        term = s.exp() - r * s + safe_xlogx_ratio(r, torch.ones_like(r)) - r
        f = (w * term).sum()
        score = score + (p_xt.detach() if pathwise_only else p_xt) * f
    P_T = torch.linalg.matrix_exp(h_T * Q)
    p_T = torch.einsum("lv,lvy->ly", p0_hat, P_T)
    prior = (mu_hat[..., None] * safe_xlogx_ratio(P_T, p_T[:, None, :])).sum()
    return score + prior


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_bound_gradient_matches_the_exact_gradient_of_the_expected_bound(monkeypatch, backend):
    """The mean of the estimator's rate gradient (pathwise + score-function part with the leave-one-out baseline)
    over many draws of x_t equals the exact gradient of E_{x_t} DWDSE + prior KL (V = 3, L = 2, every x_t
    enumerated, dense expm, float64) within 5 standard errors; the pathwise part alone is off by far more."""
    if backend == "native" and backends.load_extension() is None:
        pytest.skip("slimrate._C is not built")
    monkeypatch.setenv("SLIMRATE_BACKEND", backend)
    L, V = 2, 3
    perm = torch.stack([torch.randperm(V) for _ in range(L)])
    rates = RateMatrix(perm, 0.2 + 1.3 * torch.rand(L, V - 1, dtype=torch.float64))
    net, noise = CouplingNet(L, V), LogLinearNoise()
    x0 = torch.randint(0, V, (L,))
    mu_hat = torch.softmax(torch.randn(L, V, dtype=torch.float64), -1)
    p0_hat = torch.softmax(torch.randn(L, V, dtype=torch.float64), -1)
    h_T, t = float(noise.total(torch.tensor(1.0, dtype=torch.float64))), torch.tensor(0.4, dtype=torch.float64)

    exact = torch.autograd.grad(exact_bound(rates, net, noise, x0, t, mu_hat, p0_hat, h_T), rates.raw)[0]
    pathwise = torch.autograd.grad(exact_bound(rates, net, noise, x0, t, mu_hat, p0_hat, h_T, True), rates.raw)[0]
    draws, n = 12, 20_000
    grads = []
    for _ in range(draws):
        loss = matrix_bound_loss(net, rates, noise, x0.expand(n, L), mu_hat, p0_hat, h_T, t=t.expand(n))
        grads.append(torch.autograd.grad(loss.surrogate, rates.raw)[0])
    grads = torch.stack(grads)
    mean, se = grads.mean(0), grads.std(0) / draws ** 0.5
    error = (mean - exact).abs()
    assert (error <= 5 * se + 1e-9).all(), f"max error {error.max():.3g} at {error.argmax()}, se {se.tolist()}"
    assert ((pathwise - exact).abs() > 20 * se).any(), "the test cannot tell the pathwise part from the whole"


class NoEma:
    """The EMA hook's ``applied`` without an average: the network as it is."""

    def applied(self):
        return contextlib.nullcontext()


def corpus(tmp_path):
    """A text of 528 characters: 475 for training, 29 non-overlapping windows of 16, so a pass at batch 8 is
    ceil(29 / 8) = 4 steps."""
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog " * 12)
    return str(path)


def record_events(monkeypatch):
    """Log every matrix step "M", score step "S" and p̂_0 re-estimate "P" of a run, in order."""
    events = []
    for cls, name, mark in ((OuterLoop, "matrix_step", "M"), (OuterLoop, "estimate_p0", "P"),
                            (DMBModel, "forward", "S")):
        original = getattr(cls, name)

        def logged(self, *args, _original=original, _mark=mark):
            events.append(_mark)
            return _original(self, *args)
        monkeypatch.setattr(cls, name, logged)
    return events


@pytest.mark.parametrize("phases, lengths", [
    ("official", dict(q_passes=0.5, score_passes=0.75)),  # 0.5·4 = 2 matrix steps, 0.75·4 = 3 score steps
    ("interleaved", dict(matrix_steps=2, outer_every=3)),
])
def test_schedules_run_matrix_and_score_steps_in_their_order(tmp_path, monkeypatch, phases, lengths):
    """8 score steps: 2 matrix steps before the first score step, then after every 3 score steps a p̂_0 estimate
    and 2 matrix steps, none after the last score step; dmb.json records the phases and the lengths."""
    events = record_events(monkeypatch)
    train_dmb(DMBConfig(out_dir=str(tmp_path / "run"), data=corpus(tmp_path), phases=phases, steps=8,
                        checkpoint_every=0, **lengths, **TINY))
    assert "".join(events) == "MM" + "SSS" + "PMM" + "SSS" + "PMM" + "SS"
    record = json.loads((tmp_path / "run" / "dmb.json").read_text())
    assert record["schedule"] == {"train_windows": 29, "score_steps_per_iteration": 3, "matrix_steps_per_phase": 2}
    assert [(p["after_step"], p["matrix_steps"]) for p in record["matrix_phases"]] == [(0, 2), (3, 2), (6, 2)]
    assert all(p["rate_into_last"] > 0 and "matrix_bound" not in p for p in record["matrix_phases"])


def test_official_schedule_counts_whole_passes(tmp_path, monkeypatch):
    """The official defaults' lengths: 15 passes of matrix steps (15·4 = 60) before any score step."""
    events = record_events(monkeypatch)
    train_dmb(DMBConfig(out_dir=str(tmp_path / "run"), data=corpus(tmp_path), phases="official", steps=2,
                        checkpoint_every=0, **TINY))
    assert "".join(events) == "M" * 60 + "SS"


def test_official_p0_starts_random_per_position(tmp_path):
    """Normalised U(0, 1) rows, one per position, set by the seed; not the histogram (interleaved keeps μ̂)."""
    data = load_token_data("text8", 16)
    p0 = build_model(DMBConfig(out_dir=str(tmp_path), phases="official", seed=3, **TINY), data).p0_hat
    assert p0.shape == (16, 27) and p0.dtype == torch.float64 and (p0 > 0).all()
    torch.testing.assert_close(p0.sum(-1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (p0[1:] - p0[:1]).abs().max() > 0.01  # positions differ
    assert (p0 - data.histogram()).abs().max() > 0.01
    same = build_model(DMBConfig(out_dir=str(tmp_path), phases="official", seed=3, **TINY), data).p0_hat
    other = build_model(DMBConfig(out_dir=str(tmp_path), phases="official", seed=4, **TINY), data).p0_hat
    assert torch.equal(p0, same) and not torch.equal(p0, other)
    interleaved = build_model(DMBConfig(out_dir=str(tmp_path), **TINY), data).p0_hat
    assert torch.equal(interleaved, data.histogram())


@pytest.mark.parametrize("phases", ["official", "interleaved"])
def test_p0_reestimate_is_per_position_and_unsmoothed_only_when_official(tmp_path, monkeypatch, phases):
    """The estimate from the last step's probabilities (n, L, V), some negative and some zero: official = the
    per-position mean of the clamped, renormalised rows (zeros stay zero); interleaved = pooled over the
    exchangeable text positions, plus one uniform pseudo-sample."""
    from slimrate.dmb import outer_loop
    from slimrate.dmb.sampler import SampleResult

    n, L, V = 5, 16, 27
    last = torch.rand(n, L, V, dtype=torch.float64) - 0.1
    last[:, :, 3] = 0.0
    calls = []

    def fake_sample(net, rates, noise, p_T, samples, steps):
        calls.append((samples, steps))
        return SampleResult(tokens=torch.zeros(samples, L, dtype=torch.long), last_probs=last)

    monkeypatch.setattr(outer_loop, "reverse_sample", fake_sample)
    config = DMBConfig(out_dir=str(tmp_path), phases=phases, **{**TINY, "p0_samples": n, "p0_steps": 7})
    data = load_token_data("text8", 16)
    model = build_model(config, data)
    OuterLoop(model, NoEma(), data, config).estimate_p0()
    p = last.clamp_min(0)
    p = p / p.sum(-1, keepdim=True)
    if phases == "official":
        expected = p.mean(0)
    else:
        pooled = n * L
        expected = ((p.mean((0, 1)) * pooled + 1 / V) / (pooled + 1)).expand(L, V)
    assert calls == [(n, 7)]
    torch.testing.assert_close(model.p0_hat, expected, rtol=0, atol=1e-15)
    assert (model.p0_hat[:, 3] == 0).all() == (phases == "official")


def test_interleaved_first_phase_is_the_prior_kl_descent_it_always_was(tmp_path):
    """A one-step run with the defaults ends with the rates of ``matrix_steps`` AdamW steps (lr 1e-3, weight decay
    1e-2, clip 1) on matrix_loss from the gather init, recomputed here, and p̂_0 = μ̂ (no re-estimate yet)."""
    from slimrate.dmb import RateMatrix as Rates
    from slimrate.dmb import matrix_loss

    train_dmb(DMBConfig(out_dir=str(tmp_path / "run"), steps=1, matrix_steps=3, **TINY))
    model = load_model(tmp_path / "run")[0]
    data = load_token_data("text8", 16)
    mu_hat = data.histogram()
    h_T = float(LogLinearNoise().total(torch.tensor(1.0, dtype=torch.float64)))
    rates = Rates.from_data(mu_hat, "gather", h_T=h_T)
    optimizer = torch.optim.AdamW([rates.raw], lr=1e-3, weight_decay=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        matrix_loss(rates, mu_hat, mu_hat, h_T).backward()
        torch.nn.utils.clip_grad_norm_([rates.raw], 1.0)
        optimizer.step()
    assert torch.equal(model.rates.raw, rates.raw.detach())
    assert torch.equal(model.p0_hat, mu_hat)


def test_p0_settings_resolve_per_schedule(tmp_path):
    assert DMBConfig(out_dir=str(tmp_path)).p0_sampling == (32, 32)
    official = DMBConfig(out_dir=str(tmp_path), phases="official")
    assert official.p0_sampling == (512, 128)
    assert dataclasses.replace(DMBConfig(out_dir=str(tmp_path)), phases="official").p0_sampling == (512, 128)
    assert dataclasses.replace(official, phases="interleaved").p0_sampling == (32, 32)
    given = DMBConfig(out_dir=str(tmp_path), phases="official", p0_samples=7, p0_steps=5)
    assert given.p0_sampling == (7, 5) and dataclasses.replace(given, phases="interleaved").p0_sampling == (7, 5)
    resolved = official.resolved()
    assert (resolved.p0_samples, resolved.p0_steps) == (512, 128) and resolved.resolved() == resolved


def test_run_record_holds_the_p0_sampling_used(tmp_path):
    settings = {k: v for k, v in TINY.items() if k not in ("p0_samples", "p0_steps")}
    train_dmb(DMBConfig(out_dir=str(tmp_path / "run"), steps=1, matrix_steps=1, **settings))
    saved = load_model(tmp_path / "run")[1]
    assert (saved.p0_samples, saved.p0_steps) == (32, 32)


@pytest.mark.parametrize("setting, message", [
    (dict(phases="authors"), r"phases: expected one of \('interleaved', 'official'\), got 'authors'"),
    (dict(q_objective="elbo"), r"q_objective: expected one of \('prior', 'bound'\), got 'elbo'"),
    (dict(q_passes=0), "q_passes: expected a finite number of passes > 0, got 0"),
    (dict(q_passes=float("nan")), "q_passes: expected a finite number of passes > 0, got nan"),
    (dict(score_passes=-1.0), "score_passes: expected a finite number of passes > 0, got -1.0"),
    (dict(score_passes="10"), "score_passes: expected a finite number of passes > 0, got '10'"),
    (dict(method="sedd-absorb", q_objective="bound"), "q_objective: 'bound' concerns DMB's matrix learning; "
                                                      "sedd-absorb has a fixed Q"),
    (dict(method="sedd-uniform", phases="official"), "phases: 'official' concerns DMB's matrix learning"),
    (dict(learn_q=False, phases="official"), r"phases: 'official' concerns matrix learning, which learn_q=False "
                                             r"turns off \(leave it 'interleaved' or set learn_q=True\)"),
    (dict(learn_q=False, q_objective="bound"), "q_objective: 'bound' concerns matrix learning, which learn_q=False"),
    (dict(q_objective="bound", batch=1), "batch: q_objective='bound' needs >= 2 sequences per batch"),
    (dict(p0_samples=0), "p0_samples: expected an int >= 1, got 0"),
    (dict(eval_samples=3), r"eval_samples: expected an even number >= 2 \(two times in each stratum of t"),
], ids=["phases", "objective", "q-passes-0", "q-passes-nan", "score-passes-negative", "score-passes-str",
        "bound-baseline", "official-baseline", "official-fixed-q", "bound-fixed-q", "bound-batch-1", "p0-samples",
        "eval-samples-odd"])
def test_config_rejects_bad_schedule_settings(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        DMBConfig(out_dir=str(tmp_path), **setting)


@pytest.mark.parametrize("argv, message", [
    (["--phases", "authors"], "invalid choice: 'authors'"),
    (["--q-objective", "elbo"], "invalid choice: 'elbo'"),
    (["--q-passes", "0"], "--q-passes"),
    (["--p0-samples", "0"], "--p0-samples: expected an integer > 0, got 0"),
    (["--method", "sedd-absorb", "--q-objective", "bound"], "q_objective: 'bound' concerns DMB's matrix learning"),
])
def test_cli_rejects_bad_schedule_flags(tmp_path, capsys, argv, message):
    from slimrate.cli import main

    assert main(["dmb", "train", "--budget", "2", "--out", str(tmp_path / "run"), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["prior", "bound"])
def test_official_run_resumes_bit_identically_after_a_crash(tmp_path, monkeypatch, objective):
    """8 steps of the official schedule (3 score steps and 2 matrix steps per iteration), a checkpoint every 4:
    a run that crashes at step 5 and is resumed ends with the weights, rates, p̂_0, matrix-phase records and bound
    of the uninterrupted run."""
    torch.set_num_threads(1)  # bit-identical resume needs a fixed thread count (slimrate.train.loop)
    # The bound's rate gradient on the reference backend, which every build has (resuming does not depend on the
    # backend; the native gradient is checked in test_bound_gradient_matches_the_exact_gradient...).
    if objective == "bound":
        monkeypatch.setenv("SLIMRATE_BACKEND", "reference")
    config = dict(data=corpus(tmp_path), phases="official", q_objective=objective, q_passes=0.5, score_passes=0.75,
                  steps=8, checkpoint_every=4, **TINY)
    full = train_dmb(DMBConfig(out_dir=str(tmp_path / "full"), **config))
    expected = load_model(tmp_path / "full")[0].state_dict()
    with crash_score_batches_at(5), pytest.raises(Crash):
        train_dmb(DMBConfig(out_dir=str(tmp_path / "part"), **config))
    resumed = train_dmb(DMBConfig(out_dir=str(tmp_path / "part"), resume=True, **config))
    got = load_model(tmp_path / "part")[0].state_dict()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert resumed["final_eval"] == full["final_eval"]
    assert resumed["matrix_phases"] == full["matrix_phases"] and len(full["matrix_phases"]) == 3
    assert ("matrix_bound" in full["matrix_phases"][-1]) == (objective == "bound")
    assert not torch.equal(expected["p0_hat"], build_model(DMBConfig(out_dir="", **config),
                                                           load_token_data(config["data"], 16)).p0_hat)


def test_outer_loop_resumes_the_state_of_versions_before_the_phase_history(tmp_path):
    """Such checkpoints kept {"optimizer", "last_kl"}: the matrix steps continue from AdamW's step count, as if the
    run had never stopped, and the missing history is warned about, not a KeyError."""
    config = DMBConfig(out_dir=str(tmp_path), matrix_steps=3, **TINY)
    data = load_token_data("text8", 16)
    torch.manual_seed(0)
    model = build_model(config, data)
    first = OuterLoop(model, NoEma(), data, config)
    first.matrix_phase(0)
    resumed = OuterLoop(model, NoEma(), data, config)
    with pytest.warns(UserWarning, match="before DMB runs kept a matrix-phase history"):
        resumed.load_state_dict({"optimizer": copy.deepcopy(first.optimizer.state_dict()), "last_kl": 0.25})
    assert resumed.updates == first.updates == 3 and resumed.history == []
    rates = model.rates.raw.detach().clone()
    first.matrix_phase(3)
    expected = model.rates.raw.detach().clone()
    model.rates.raw.data.copy_(rates)
    resumed.matrix_phase(3)
    assert torch.equal(model.rates.raw, expected)

"""Training DMB and the SEDD baselines through the shared loop (``slimrate.train.train``).

One run = score learning, the loop's steps (AdamW, UBA schedule, gradient clipping, checkpoint/resume,
metrics JSONL + TensorBoard, progress bar), plus for DMB the alternating outer loop of
docs/dmb.md §9 as a hook (``slimrate.dmb.outer_loop``): matrix phases with the network frozen, one before
the first score step and one after each outer iteration, following p̂_0 re-estimated from samples of the
EMA network.  The baselines keep Q fixed and p̂_0 = μ̂, the training histogram.  At the end,
``model.safetensors`` (EMA weights, rates, p̂_0) and ``dmb.json`` (settings, data, final bound, the matrix
phases' records), then ``manifest.json`` (format, version, SHA-256 of both;
``slimrate.train.checkpoint.write_manifest``) are written to ``out_dir``; ``load_model`` verifies them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from slimrate.dmb.baselines import AbsorbingRates, UniformRates
from slimrate.dmb.data import TokenData, load_token_data
from slimrate.dmb.elbo import elbo_bits, official_bits
from slimrate.dmb.losses import TRAIN_T_MIN, score_loss
from slimrate.dmb.model import ScoreNet, ScoreNetConfig
from slimrate.dmb.noise import NOISE_SCHEDULES, make_noise, noise_from_dict
from slimrate.dmb.outer_loop import P0_DEFAULTS, PHASES, Q_OBJECTIVES, OuterLoop, phase_lengths, random_p0
from slimrate.dmb.rate_matrix import RATE_INITS, RateMatrix
from slimrate.files import write_bytes_atomic, write_text_atomic
from slimrate.schedules import UBA
from slimrate.train import TrainConfig, check_device, full_state_dict, latest_checkpoint, shard_model, train
from slimrate.train.checkpoint import (
    DEFAULT_KEEP,
    CheckpointError,
    read_json,
    read_tensors,
    verify_manifest,
    write_manifest,
)
from slimrate.train.loop import CHECKPOINTS_DIR, PARALLEL_MODES

METHODS = ("dmb", "sedd-absorb", "sedd-uniform")
MODEL_FILE, RUN_FILE = "model.safetensors", "dmb.json"
FORMAT, VERSION = "slimrate-dmb", 2  # 2: checksums moved from dmb.json to manifest.json, which covers both
# Evaluations draw their times and x_t from a generator with this seed: every evaluation of a run uses
# the same times t (so do the methods), which keeps BPC-vs-steps curves free of time-sampling jitter.
EVAL_SEED = 12345


@dataclass
class DMBConfig:
    """Settings of one run.  data: "text8" (embedded corpus), "digits", a text file or a CIFAR-10 folder.
    steps: score-learning steps (the budget).  seq_len: text only.  model: a ``MODEL_PRESETS`` name.
    lr/weight_decay/grad_clip: AdamW for the network (DMB's code: 3e-4, 0.01, 1 at batch 512 and
    92M parameters; 1e-3 here for nets of 10⁴–10⁵ parameters, not tuned), UBA schedule with ``phi``
    after ``warmup_share`` of the steps.
    ema: EMA decay, warmed up as min(ema, (1+n)/(10+n)) (the official code; it uses 0.9999 for millions
    of steps).  DMB only: ``init`` of the rates; ``phases`` the schedule (``slimrate.dmb.outer_loop``):
    "interleaved" = ``matrix_steps`` matrix steps first and after every ``outer_every`` score steps;
    "official" = ``q_passes`` passes of matrix steps first, then ``score_passes`` passes of score steps and
    ``q_passes`` of matrix steps per outer iteration (a pass: ceil(training windows / batch) steps; outer_every
    and matrix_steps unused).  Each outer iteration starts with p̂_0 from ``p0_samples`` sequences ×
    ``p0_steps`` Euler steps (None: the schedule's own, 32 × 32 for interleaved, the official script's 512 × 128
    for official; ``p0_sampling`` gives the numbers used, and dmb.json records them); matrix steps are
    AdamW(``matrix_lr``, ``matrix_weight_decay``) on ``q_objective``: "prior" (the prior KL, exact over μ̂) or
    "bound" (DWDSE of a training batch + prior KL) (official code: 1e-3, 1e-2, clip 1).
    eval_every: bound on ``eval_sequences`` × ``eval_samples`` times every k steps (0: at the end only).
    checkpoint_every: a checkpoint of the run every k steps and at the end (0: none), the newest
    ``keep_checkpoints`` kept; resume: continue from the newest one that verifies (docs/training.md §3).
    scale_by_sigma: the network's σ̄-scaled output (``ScoreNetConfig``); None = the official codes' choice
    (SEDD-absorb yes, DMB's example script and SEDD-uniform no).
    learn_q: DMB only; False keeps Q at its ``init`` and p̂_0 = μ̂ (no outer loop): the control that shows
    what matrix learning adds.  parallel: under torchrun (baselines only), "ddp" or "fsdp" (the model
    sharded with FSDP2, sharded checkpoints; docs/training.md §6).  device: where the run trains, evaluates and
    samples: "cpu", "cuda" (under torchrun: each process's cuda:LOCAL_RANK) or "cuda:N"; the initial weights, the
    batches and the times are drawn on the CPU (the same on every device), x_t and p̂_0's samples on the device."""

    out_dir: str
    data: str = "text8"
    method: str = "dmb"
    steps: int = 2000
    batch: int = 32
    seq_len: int = 64
    model: str = "small"
    schedule: str = "loglinear"
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    phi: float = 2.0
    warmup_share: float = 0.05
    ema: float = 0.999
    init: str = "gather"
    phases: str = "interleaved"
    q_objective: str = "prior"
    outer_every: int = 500
    matrix_steps: int = 50
    q_passes: float = 15.0
    score_passes: float = 10.0
    matrix_lr: float = 1e-3
    matrix_weight_decay: float = 0.01
    p0_samples: int | None = None
    p0_steps: int | None = None
    eval_every: int = 0
    eval_sequences: int = 64
    eval_samples: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = DEFAULT_KEEP
    log_every: int = 50
    seed: int = 0
    resume: bool = False
    progress: bool = True
    scale_by_sigma: bool | None = None
    learn_q: bool = True
    parallel: str = "ddp"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.schedule not in NOISE_SCHEDULES:
            raise ValueError(f"schedule: expected one of {NOISE_SCHEDULES}, got {self.schedule!r}")
        if not self.learn_q and self.method != "dmb":
            raise ValueError(f"learn_q: only DMB learns Q; {self.method} has a fixed Q, so learn_q=False means "
                             "nothing there (leave it True)")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel: expected one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        check_device(self.device)
        if self.init not in RATE_INITS:
            raise ValueError(f"init: expected one of {RATE_INITS}, got {self.init!r}")
        self._check_outer_loop()
        for name, low in (("steps", 1), ("batch", 1), ("seq_len", 1), ("outer_every", 1), ("matrix_steps", 1),
                          ("p0_samples", 1), ("p0_steps", 1), ("eval_sequences", 1), ("log_every", 1),
                          ("checkpoint_every", 0), ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if value is None and name in ("p0_samples", "p0_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.eval_samples < 2 or self.eval_samples % 2:
            raise ValueError(f"eval_samples: expected an even number >= 2 (two times in each stratum of t; "
                             f"slimrate.dmb.elbo), got {self.eval_samples}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema: expected a decay in [0, 1), got {self.ema!r}")

    def _check_outer_loop(self) -> None:
        """Check the schedule and objective settings."""
        if self.phases not in PHASES:
            raise ValueError(f"phases: expected one of {PHASES}, got {self.phases!r}")
        if self.q_objective not in Q_OBJECTIVES:
            raise ValueError(f"q_objective: expected one of {Q_OBJECTIVES}, got {self.q_objective!r}")
        for name in ("q_passes", "score_passes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name}: expected a finite number of passes > 0, got {value!r}")
        learned = {"phases": (self.phases, "interleaved"), "q_objective": (self.q_objective, "prior")}
        for name, (value, default) in learned.items():
            if value != default and self.method != "dmb":
                raise ValueError(f"{name}: {value!r} concerns DMB's matrix learning; {self.method} has a fixed Q "
                                 f"(leave it {default!r} or use method='dmb')")
            if value != default and not self.learn_q:
                raise ValueError(f"{name}: {value!r} concerns matrix learning, which learn_q=False turns off "
                                 f"(leave it {default!r} or set learn_q=True)")
        if self.q_objective == "bound" and self.batch == 1:
            raise ValueError(f"batch: q_objective='bound' needs >= 2 sequences per batch (the leave-one-out "
                             f"baseline of its gradient), got {self.batch}")

    @property
    def p0_sampling(self) -> tuple[int, int]:
        """(sequences, Euler steps) of each p̂_0 estimate: p0_samples / p0_steps, or the schedule's own where None
        (resolved when used, so ``dataclasses.replace(config, phases=...)`` takes the new schedule's)."""
        samples, steps = P0_DEFAULTS[self.phases]
        return (samples if self.p0_samples is None else self.p0_samples,
                steps if self.p0_steps is None else self.p0_steps)

    def resolved(self) -> DMBConfig:
        """This config with p0_samples / p0_steps set to ``p0_sampling`` (what dmb.json records)."""
        samples, steps = self.p0_sampling
        return dataclasses.replace(self, p0_samples=samples, p0_steps=steps)


class EMA:
    """Exponential moving average of a module's parameters, a training-loop hook (state in checkpoints)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.params = [p for p in module.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    def after_step(self, step: int) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                s.lerp_(p.detach(), 1 - d)

    @contextlib.contextmanager
    def applied(self):
        """Swap the EMA weights in for the duration of the block."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)


class DMBModel(nn.Module):
    """The score network, the forward process and p̂_0 (L, V) in one module (so one checkpoint holds all).
    ``forward(x0)`` is score learning's loss, nats per sequence averaged over the batch."""

    def __init__(self, net: ScoreNet, rates: nn.Module, p0_hat: torch.Tensor, noise) -> None:
        super().__init__()
        self.net, self.rates, self.noise = net, rates, noise
        self.register_buffer("p0_hat", p0_hat.double().clone())

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return score_loss(self.net, self.rates, self.noise, x0, TRAIN_T_MIN)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (those of p̂_0, a buffer every model has)."""
        return self.p0_hat.device

    @property
    def total_noise_T(self) -> float:
        return float(self.noise.total(torch.tensor(1.0, dtype=torch.float64)))

    def prior(self) -> torch.Tensor:
        """p_T = p̂_0·exp(σ̄(1)·Q), (L, V)."""
        return self.rates.push_forward(self.p0_hat, self.total_noise_T)


def build_model(config: DMBConfig, data: TokenData) -> DMBModel:
    """Network, forward process and p̂_0 for ``config.method`` on ``data``, freshly initialised."""
    noise = make_noise(config.schedule)
    mu_hat = data.histogram()
    h_T = float(noise.total(torch.tensor(1.0, dtype=torch.float64)))
    if config.method == "dmb":
        rates = RateMatrix.from_data(mu_hat, config.init, h_T=h_T, learnable=config.learn_q)
        p0 = random_p0(data.seq_len, data.vocab_size, config.seed) if config.phases == "official" else mu_hat
    elif config.method == "sedd-absorb":
        rates = AbsorbingRates(data.vocab_size, data.seq_len)
        p0 = torch.cat([mu_hat, torch.zeros(data.seq_len, 1, dtype=torch.float64)], dim=1)  # [MASK] never data
    else:
        rates = UniformRates(data.vocab_size, data.seq_len)
        p0 = mu_hat
    scale = config.method == "sedd-absorb" if config.scale_by_sigma is None else config.scale_by_sigma
    net_config = ScoreNetConfig.preset(config.model, rates.vocab_size, data.seq_len, scale_by_sigma=scale)
    torch.manual_seed(config.seed)
    return DMBModel(ScoreNet(net_config), rates, p0, noise)


class BoundEvaluator:
    """The loop's ``evaluate``: the bound on fixed evaluation sequences with the EMA weights."""

    def __init__(self, ema: EMA, x_eval: torch.Tensor, samples: int) -> None:
        self.ema, self.x_eval, self.samples = ema, x_eval, samples

    def __call__(self, model: DMBModel) -> dict[str, float]:
        with self.ema.applied():
            result = bound_of(model, self.x_eval, self.samples, EVAL_SEED)
        return {"bits_per_token": result.bits_per_token, "bits_per_token_se": result.standard_error,
                "score_bits": result.score_bits, "prior_bits": result.prior_bits}


def bound_of(model: DMBModel, x_eval: torch.Tensor, samples: int, seed: int):
    """``elbo_bits`` of ``model`` (current weights) on x_eval (moved to the model's device) with a CPU generator
    seeded by ``seed`` (the same times and uniforms on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return elbo_bits(model.net, model.rates, model.noise, model.prior(), x_eval.to(model.device), samples=samples,
                     generator=generator)


def official_bound_of(model: DMBModel, x_eval: torch.Tensor, repeats: int, seed: int):
    """``official_bits`` (the DMB authors' protocol) of ``model`` on x_eval, as ``bound_of``."""
    generator = torch.Generator().manual_seed(seed)
    return official_bits(model.net, model.rates, model.noise, model.prior(), x_eval.to(model.device),
                         repeats=repeats, generator=generator)


def run_device(config: DMBConfig) -> torch.device:
    """The device of ``config``'s run: config.device, where "cuda" under torchrun is this process's GPU,
    cuda:LOCAL_RANK (where the shared loop expects the model)."""
    device = check_device(config.device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def train_dmb(config: DMBConfig) -> dict[str, Any]:
    """Train one run (module docstring); returns the run record written to ``out_dir/dmb.json``."""
    if config.method == "dmb" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("method: DMB's outer loop (p̂_0 sampling, matrix learning) runs in one process; run it "
                         "without torchrun, or train a baseline (sedd-absorb, sedd-uniform) under torchrun")
    data = load_token_data(config.data, config.seq_len)
    device = run_device(config)
    model = build_model(config, data).to(device)  # built on the CPU: the same initial weights on every device
    if config.parallel == "fsdp":  # the network is the root: evaluation and sampling call it, not model
        shard_model(model.net)  # before the EMA and the optimizer, which keep the parameters
    out = Path(config.out_dir)
    ema = EMA(model.net, config.ema)
    hooks: list[Any] = [ema]
    outer = None
    if config.method == "dmb" and config.learn_q:
        outer = OuterLoop(model, ema, data, config)
        hooks.append(outer)
        if latest_checkpoint(out / CHECKPOINTS_DIR) is None:  # a fresh run: matrix learning comes first
            outer.matrix_phase(0)
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = UBA(optimizer, config.steps, phi=config.phi, warmup_steps=int(config.warmup_share * config.steps))
    x_eval = data.eval_subset(config.eval_sequences).to(device)
    loop_config = TrainConfig(steps=config.steps, out_dir=str(out), eval_every=config.eval_every,
                              log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                              keep_checkpoints=config.keep_checkpoints, resume=config.resume,
                              max_grad_norm=config.grad_clip, seed=config.seed, progress=config.progress,
                              desc=f"dmb {config.method}", parallel=config.parallel)
    result = train(model, optimizer, lambda m, x0: m(x0), data.batch_fn(config.batch, config.seed, device),
                   loop_config, scheduler=scheduler, evaluate=BoundEvaluator(ema, x_eval, config.eval_samples),
                   hooks=hooks)
    with ema.applied():
        return save_model(out, model, config, data, result.eval, outer.history if outer else [])


def save_model(out: Path, model: DMBModel, config: DMBConfig, data: TokenData, final: dict,
               matrix_phases: list[dict[str, float]]) -> dict[str, Any]:
    """Write model.safetensors (the module's current state on the CPU, whole when sharded), dmb.json and their
    manifest atomically; returns dmb.json's content (the run record: settings, network, noise, data, final bound, and
    for DMB the schedule's lengths and one record per matrix phase, ``OuterLoop.history``)."""
    state = {name: t.detach().cpu().contiguous() for name, t in full_state_dict(model).items()}
    write_bytes_atomic(out / MODEL_FILE, save_safetensors(state, metadata={"format": FORMAT}))
    record = {"config": asdict(config.resolved()), "net": asdict(model.net.cfg), "noise": model.noise.to_dict(),
              "data": {"name": data.name, "vocab_size": data.vocab_size, "seq_len": data.seq_len,
                       "image_shape": data.image_shape},
              "parameters": sum(p.numel() for p in model.net.parameters()), "final_eval": final,
              "matrix_phases": matrix_phases}
    if config.method == "dmb" and config.learn_q:
        score_steps, matrix_steps = phase_lengths(config, data.train_windows)
        record["schedule"] = {"train_windows": data.train_windows, "score_steps_per_iteration": score_steps,
                              "matrix_steps_per_phase": matrix_steps}
    write_text_atomic(out / RUN_FILE, json.dumps(record, indent=1) + "\n")
    write_manifest(out, FORMAT, VERSION, (MODEL_FILE, RUN_FILE))
    return record


def load_model(directory: str | Path, device: str = "cpu") -> tuple[DMBModel, DMBConfig, dict[str, Any]]:
    """The trained model of a run folder on ``device`` ("cpu", "cuda", "cuda:N"), its config (with that device)
    and run record (dmb.json), after checking both files against the folder's manifest; ``CheckpointError``
    naming the file if either is missing, corrupt, edited or not one this slimrate can build a model from."""
    check_device(device)
    directory = Path(directory)
    fix = "pass the --out folder of a finished `slimrate dmb train` run of this slimrate version, or train it again"
    verify_manifest(directory, FORMAT, VERSION, (MODEL_FILE, RUN_FILE), fix)
    record = read_json(directory / RUN_FILE, fix)
    state = read_tensors(directory / MODEL_FILE, fix)
    # Verified, yet perhaps not written by this code: a missing or ill-typed field, weights that do not fit.
    try:
        model, config = _build_trained(record, state, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{directory / RUN_FILE}: does not describe the model in {MODEL_FILE} "
                              f"({type(e).__name__}: {e})", fix) from e
    return model.to(device), config, record


def _build_trained(record: dict[str, Any], state: dict[str, torch.Tensor],
                   device: str) -> tuple[DMBModel, DMBConfig]:
    """The model (on the CPU) and config (with ``device``: the run's own may be absent here) that dmb.json's
    ``record`` describes, with the weights ``state``, in eval mode."""
    unknown = set(record["config"]) - {f.name for f in dataclasses.fields(DMBConfig)}
    if unknown:
        raise ValueError(f"settings {sorted(unknown)} are unknown to this slimrate; the run was written by another "
                         "version")
    config = DMBConfig(**{**record["config"], "resume": False, "device": device})
    noise = noise_from_dict(record["noise"])
    V, L = record["net"]["vocab_size"], record["net"]["seq_len"]
    if config.method == "dmb":
        rates = RateMatrix(state["rates.perm"], torch.relu(state["rates.raw"]))
    elif config.method == "sedd-absorb":
        rates = AbsorbingRates(V - 1, L)
    else:
        rates = UniformRates(V, L)
    model = DMBModel(ScoreNet(ScoreNetConfig(**record["net"])), rates, state["p0_hat"], noise)
    model.load_state_dict(state)
    model.eval()
    return model, config

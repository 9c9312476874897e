"""DMB against SEDD-absorb and SEDD-uniform on the embedded text corpus, over seeds: same network, data, budget.

Each arm is one set of ``DMBConfig`` overrides on the shared training settings (``study_training``), run once per
seed: the SEDD baselines (fixed Q), DMB with the interleaved or the official schedule of matrix and score
learning, with Q trained on the prior term or on the whole bound, and DMB with Q frozen at its init (the
control: what matrix learning adds).  Arms whose settings this slimrate's ``DMBConfig`` does not have are listed
as not run.  Every run keeps its folder, ``<runs_dir>/<slug>-s<seed>``; a folder whose manifest verifies and
whose saved settings equal the run's is reused, not retrained, so runs trained earlier with the same settings
(``train_dmb``) enter the study.  Each run's final EMA model is evaluated on held-out windows with our bound and
the DMB authors' protocol (``slimrate.dmb.elbo``); nothing is selected on those windows.  Runs train and are
evaluated on the shared settings' ``device``.  The report is
``slimrate.studies.dmb_report``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimrate.dmb.data import load_token_data
from slimrate.dmb.driver import EVAL_SEED, DMBConfig, bound_of, load_model, official_bound_of, train_dmb
from slimrate.dmb.sampler import reverse_sample
from slimrate.studies.dmb_report import STUDY_STEPS, results_plot, results_table, study_stem
from slimrate.studies.protocol import Study
from slimrate.train import CheckpointError, read_jsonl


@dataclass(frozen=True)
class Arm:
    """One arm: its label in the report, the slug of its run folders and its ``DMBConfig`` overrides."""

    label: str
    slug: str
    overrides: dict


# The slugs of the SEDD arms, "dmb interleaved" and "dmb frozen at init" are the folder names of runs trained
# before the study had this form; the others are the label with spaces → '-'.
ARMS = (Arm("sedd-absorb", "sedd-absorb", {"method": "sedd-absorb"}),
        Arm("sedd-uniform", "sedd-uniform", {"method": "sedd-uniform"}),
        Arm("dmb interleaved", "dmb-interleaved-prior", {"method": "dmb"}),
        Arm("dmb official", "dmb-official", {"method": "dmb", "phases": "official"}),
        Arm("dmb interleaved bound", "dmb-interleaved-bound", {"method": "dmb", "q_objective": "bound"}),
        Arm("dmb official bound", "dmb-official-bound", {"method": "dmb", "phases": "official",
                                                          "q_objective": "bound"}),
        Arm("dmb frozen at init", "dmb-frozen-init", {"method": "dmb", "learn_q": False}))
ARM_SLUGS = tuple(arm.slug for arm in ARMS)
# Settings that do not change what a run computes (the device changes its rounding only): a saved run that differs
# only in these is reused.
IGNORED_FIELDS = ("out_dir", "progress", "resume", "device")


def study_training() -> DMBConfig:
    """The training settings every run of the full study shares; each arm overrides some, each run sets
    out_dir and seed."""
    return DMBConfig(out_dir="", steps=STUDY_STEPS, eval_every=500, checkpoint_every=0, log_every=500, progress=False)


@dataclass
class DMBStudyConfig:
    """The default: every arm × seeds 0, 1, 2, 10000 steps of the `small` net each (≈ 5–6 minutes a run on 2
    idle CPU cores, torch 2.13; 3–5× that on a shared machine).  Run seeds are ``seed`` + each of ``seeds``.
    runs_dir: where run folders are kept (None: a temporary folder, deleted after); jobs: runs trained at once,
    each in its own process with one thread; train_missing: False reports only the runs whose folders are
    finished and lists the others as not run (a study trained elsewhere, or not all done).  Each run ends with
    our bound on ``final_sequences`` × ``final_samples`` times, the official protocol's ``official_repeats``
    passes over the same windows, and ``sample_count`` samples of ``sample_steps`` Euler steps (the text in the
    report)."""

    arms: tuple[str, ...] = ARM_SLUGS
    seeds: tuple[int, ...] = (0, 1, 2)
    train: DMBConfig = field(default_factory=study_training)  # its eval_* settings: the curve
    runs_dir: str | None = None
    jobs: int = 1
    train_missing: bool = True
    final_sequences: int = 256
    final_samples: int = 16
    official_repeats: int = 20
    sample_count: int = 3
    sample_steps: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [slug for slug in self.arms if slug not in ARM_SLUGS]
        if unknown or not self.arms:
            raise ValueError(f"arms: expected slugs among {', '.join(ARM_SLUGS)}, got {list(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, at least one, got {list(self.seeds)}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs: expected an int >= 1, got {self.jobs!r}")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + s for s in self.seeds)


def arms_supported() -> tuple[Arm, ...]:
    """The arms whose overrides name only fields this DMBConfig has."""
    names = {f.name for f in dataclasses.fields(DMBConfig)}
    return tuple(arm for arm in ARMS if set(arm.overrides) <= names)


# The quick version's official schedule: phases of a few steps (a pass is ~42000 steps of batch 8 on windows of 16).
QUICK_PASSES = {"q_passes": 1e-4, "score_passes": 1e-4}


def quick_config() -> DMBStudyConfig:
    """A seconds-long version for the tests: every arm, two seeds, a few steps of the tiny net on short windows."""
    fields = {f.name for f in dataclasses.fields(DMBConfig)}
    train = dataclasses.replace(study_training(), steps=6, eval_every=3, batch=8, seq_len=16, model="tiny",
                                eval_sequences=4, eval_samples=2, outer_every=3, matrix_steps=2, p0_samples=4,
                                p0_steps=4, log_every=1, **{k: v for k, v in QUICK_PASSES.items() if k in fields})
    return DMBStudyConfig(arms=tuple(arm.slug for arm in arms_supported()), seeds=(0, 1), train=train,
                          final_sequences=8, final_samples=2, official_repeats=3, sample_count=1, sample_steps=4)


def arm_config(cfg: DMBStudyConfig, arm: Arm, seed: int, runs: Path) -> DMBConfig:
    """The settings of ``arm``'s run with ``seed``: the study's shared settings that differ from DMBConfig's
    defaults, then the arm's overrides; a setting left at its default is resolved for the arm (a schedule's own
    p̂_0 sampling, say).  TypeError for a field DMBConfig lacks, ValueError for a combination it refuses."""
    defaults = DMBConfig(out_dir="")
    shared = {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(DMBConfig)
              if getattr(cfg.train, f.name) != getattr(defaults, f.name)}
    return DMBConfig(**{**shared, **arm.overrides, "seed": seed, "out_dir": str(runs / f"{arm.slug}-s{seed}")})


def same_settings(saved: DMBConfig, wanted: DMBConfig) -> bool:
    """Equal field by field once resolved (p̂_0 sampling left to the schedule = its numbers), except
    ``IGNORED_FIELDS`` (fields a saved file lacks took their defaults on load)."""
    saved, wanted = saved.resolved(), wanted.resolved()
    return all(getattr(saved, f.name) == getattr(wanted, f.name) for f in dataclasses.fields(DMBConfig)
               if f.name not in IGNORED_FIELDS)


def finished(config: DMBConfig) -> bool:
    """Whether config.out_dir holds a run that verifies and was trained with ``config``'s settings."""
    try:
        _, saved, _ = load_model(config.out_dir)
    except CheckpointError:
        return False
    return same_settings(saved, config)


def train_one_thread(config: DMBConfig) -> None:
    """One run in a worker process: one thread, so that ``jobs`` runs share the cores without contention."""
    torch.set_num_threads(1)
    train_dmb(config)


def train_missing(configs: list[DMBConfig], jobs: int) -> list[DMBConfig]:
    """Train every run of ``configs`` that is not finished (a stale folder is removed first), ``jobs`` at a
    time; returns the ones trained."""
    missing = [c for c in configs if not finished(c)]
    for config in missing:
        shutil.rmtree(config.out_dir, ignore_errors=True)
    if jobs == 1 or len(missing) < 2:
        for config in missing:
            train_dmb(config)
    else:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(missing)), maxtasksperchild=1) as pool:
            pool.map(train_one_thread, missing, chunksize=1)
    return missing


def rate_summary(rates) -> dict:
    """What DMB's Q is after training: the mean rate into the last (absorbing) rank, the mean and largest of the
    other rates, over positions (the gather init: 1, 1e-10, 1e-10)."""
    a = rates.rates().detach()
    return {"absorbing_rate": float(a[:, -1].mean()), "other_rate_mean": float(a[:, :-1].mean()),
            "other_rate_max": float(a[:, :-1].max())}


def evaluate_run(cfg: DMBStudyConfig, arm: Arm, config: DMBConfig, trained: bool) -> dict:
    """One finished run's row: final bound (ours and the official protocol), curve, speed, samples, rates."""
    out = Path(config.out_dir)
    records = read_jsonl(out / "metrics.jsonl")
    curve = [{"step": r["step"], "bpc": r["eval/bits_per_token"], "se": r["eval/bits_per_token_se"]}
             for r in records if "eval/bits_per_token" in r]
    speeds = [r["samples_per_s"] / config.batch for r in records if "samples_per_s" in r]
    model, _, record = load_model(out, config.device)
    data = load_token_data(config.data, config.seq_len)
    x_eval = data.eval_subset(cfg.final_sequences)
    final = bound_of(model, x_eval, cfg.final_samples, EVAL_SEED + 1)
    official = official_bound_of(model, x_eval, cfg.official_repeats, EVAL_SEED + 2)
    with torch.no_grad():
        tokens = reverse_sample(model.net, model.rates, model.noise, model.prior(), cfg.sample_count, cfg.sample_steps,
                                generator=torch.Generator().manual_seed(config.seed)).tokens.cpu()
    return {"arm": arm.label, "slug": arm.slug, "seed": config.seed, "method": config.method,
            "learn_q": config.learn_q, "trained": trained, "folder": str(out),
            "rates": rate_summary(model.rates) if config.method == "dmb" else None,
            "bpc": final.bits_per_token, "se": final.standard_error, "score_bpc": final.score_bits,
            "prior_bpc": final.prior_bits, "official_bpc": official.bits_per_token,
            "official_se": official.standard_error, "curve": curve,
            "steps_per_s": statistics.median(speeds[1:] if len(speeds) >= 3 else speeds),
            "parameters": record["parameters"],
            "samples": data.describe(tokens)}


def run_in(cfg: DMBStudyConfig, runs: Path) -> tuple[list[dict], dict]:
    """Build every arm's run settings (an arm this DMBConfig cannot express is recorded, not run), train the
    missing runs, evaluate all; (rows, {"arms_not_run": {label: reason}, "jobs": jobs})."""
    planned, not_run = [], {}
    for arm in (a for a in ARMS if a.slug in cfg.arms):
        try:
            planned += [(arm, arm_config(cfg, arm, seed, runs)) for seed in cfg.run_seeds]
        except (TypeError, ValueError) as e:
            not_run[arm.label] = f"{type(e).__name__}: {e}"
    if cfg.train_missing:
        trained = {c.out_dir for c in train_missing([c for _, c in planned], cfg.jobs)}
        missing = []
    else:
        trained, missing = set(), [(arm, c) for arm, c in planned if not finished(c)]
        planned = [(arm, c) for arm, c in planned if (arm, c) not in missing]
    rows = [evaluate_run(cfg, arm, c, c.out_dir in trained) for arm, c in planned]
    return rows, {"arms_not_run": not_run, "jobs": cfg.jobs,
                  "runs_not_run": [f"{arm.label}, seed {c.seed}" for arm, c in missing]}


def run_all(cfg: DMBStudyConfig) -> tuple[list[dict], dict]:
    """Every run of ``cfg`` (kept in ``cfg.runs_dir``, or a temporary folder when it is None)."""
    if cfg.runs_dir is not None:
        return run_in(cfg, Path(cfg.runs_dir))
    with tempfile.TemporaryDirectory(prefix="slimrate-dmb-study-") as runs:
        return run_in(cfg, Path(runs))


STUDY = Study(name="dmb", help="DMB (schedules, Q objectives, frozen Q) vs SEDD-absorb/uniform over seeds: bits/char",
              title="DMB vs SEDD (absorb, uniform) over seeds: bound in bits per character", stem="dmb",
              config=DMBStudyConfig, quick=quick_config, run_all=run_all, table=results_table, plot=results_plot,
              stem_of=study_stem)

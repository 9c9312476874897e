"""DMB against SEDD-absorb and SEDD-uniform on the embedded text corpus: same network, data, budget, seed.

Each run trains the same DDiT preset for the same number of score steps with the same optimizer,
schedule and batches (``slimrate.dmb.driver``); the forward process differs (DMB: learned Q with its
alternating matrix learning and p̂_0; the baselines: SEDD's fixed Q), and so may the network's output
scaling: SEDD-absorb divides its scores by e^σ̄ − 1 (``scale_by_sigma``), DMB's official script does not.
DMB therefore runs as in its code, with SEDD-absorb's scaling (so that one comparison differs only in Q),
and with Q frozen at its init (the control: what matrix learning adds).  The bound in bits per character
is evaluated on the same validation windows with the same times every ``eval_every`` steps (the curve)
and at the end on more windows and times (the table).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimrate.dmb.data import load_token_data
from slimrate.dmb.driver import EVAL_SEED, DMBConfig, bound_of, load_model, train_dmb
from slimrate.dmb.sampler import reverse_sample
from slimrate.files import figure_png
from slimrate.studies.protocol import Study, StudyResults
from slimrate.train import read_jsonl

# (label, method, scale_by_sigma (None = the official code's choice), learn_q)
RUNS = (("dmb", "dmb", None, True), ("dmb σ-scaled", "dmb", True, True), ("dmb fixed Q", "dmb", None, False),
        ("sedd-absorb", "sedd-absorb", None, True), ("sedd-uniform", "sedd-uniform", None, True))


def study_training() -> DMBConfig:
    """The training settings every run of the full study shares; ``run_one`` sets out_dir, method,
    scale_by_sigma, learn_q and seed per run."""
    return DMBConfig(out_dir="", steps=10000, eval_every=500, checkpoint_every=0, log_every=500, progress=False)


@dataclass
class DMBStudyConfig:
    """The default trains each run for 10000 steps of the `small` net: ≈ 30 steps/s on 2 idle CPU cores (torch
    2.13), so ≈ 5–6 minutes a run and ≈ 27 minutes in all; 3–5× that on a machine shared with other jobs.
    Each run ends with the bound on ``final_sequences`` × ``final_samples`` times (the table) and
    ``sample_count`` samples of ``sample_steps`` Euler steps (the text in the report)."""

    runs: tuple[tuple[str, str, bool | None, bool], ...] = RUNS
    train: DMBConfig = field(default_factory=study_training)  # its eval_* settings: the curve
    final_sequences: int = 256
    final_samples: int = 8
    sample_count: int = 3
    sample_steps: int = 128
    seed: int = 0  # every run: weights, batches, times, samples


def quick_config() -> DMBStudyConfig:
    """A seconds-long version for the tests: a few steps of the tiny net on short windows."""
    train = dataclasses.replace(study_training(), steps=6, eval_every=3, batch=8, seq_len=16, model="tiny",
                                eval_sequences=4, eval_samples=2, outer_every=3, matrix_steps=2, p0_samples=4,
                                p0_steps=4, log_every=1)
    return DMBStudyConfig(train=train, final_sequences=8, final_samples=2, sample_count=1, sample_steps=4)


def rate_summary(rates) -> dict:
    """What DMB's Q is after training: the mean rate into the last (absorbing) rank, the mean and largest of the
    other rates, over positions (the gather init: 1, 1e-10, 1e-10)."""
    a = rates.rates().detach()
    return {"absorbing_rate": float(a[:, -1].mean()), "other_rate_mean": float(a[:, :-1].mean()),
            "other_rate_max": float(a[:, :-1].max())}


def run_one(cfg: DMBStudyConfig, label: str, method: str, scale_by_sigma: bool | None, learn_q: bool,
            out_dir: Path) -> dict:
    """Train one run and evaluate it; returns its row (final bound, curve, speed, time, samples, rates)."""
    start = time.perf_counter()
    record = train_dmb(dataclasses.replace(cfg.train, out_dir=str(out_dir), method=method,
                                           scale_by_sigma=scale_by_sigma, learn_q=learn_q, seed=cfg.seed))
    records = read_jsonl(out_dir / "metrics.jsonl")
    curve = [{"step": r["step"], "bpc": r["eval/bits_per_token"], "se": r["eval/bits_per_token_se"]}
             for r in records if "eval/bits_per_token" in r]
    rates = [r["samples_per_s"] / cfg.train.batch for r in records if "samples_per_s" in r]
    model, _, _ = load_model(out_dir)
    data = load_token_data(cfg.train.data, cfg.train.seq_len)
    final = bound_of(model, data.eval_subset(cfg.final_sequences), cfg.final_samples, EVAL_SEED + 1)
    with torch.no_grad():
        tokens = reverse_sample(model.net, model.rates, model.noise, model.prior(), cfg.sample_count, cfg.sample_steps,
                                generator=torch.Generator().manual_seed(cfg.seed)).tokens
    return {"label": label, "method": method, "scale_by_sigma": model.net.cfg.scale_by_sigma, "learn_q": learn_q,
            "rates": rate_summary(model.rates) if method == "dmb" else None,
            "bpc": final.bits_per_token, "se": final.standard_error, "score_bpc": final.score_bits,
            "prior_bpc": final.prior_bits, "curve": curve,
            "steps_per_s": statistics.median(rates[1:] if len(rates) >= 3 else rates),
            "parameters": record["parameters"], "samples": data.describe(tokens),
            "minutes": (time.perf_counter() - start) / 60}


def run_all(cfg: DMBStudyConfig) -> tuple[list[dict], dict]:
    """Train and evaluate every run (run folders in a temporary directory); one row each, no study-wide facts."""
    with tempfile.TemporaryDirectory(prefix="slimrate-dmb-study-") as runs:
        return [run_one(cfg, *run, Path(runs) / f"run{i}") for i, run in enumerate(cfg.runs)], {}


def compare(a: dict, b: dict) -> str:
    """a against b: the difference in bits/char with its combined Monte Carlo standard error, in words."""
    diff = a["bpc"] - b["bpc"]
    se = (a["se"] ** 2 + b["se"] ** 2) ** 0.5
    z = diff / se if se > 0 else float("inf")
    words = "no significant difference" if abs(z) < 2 else ("lower (better)" if diff < 0 else "higher (worse)")
    return (f"{a['label']} {a['bpc']:.3f} vs {b['label']} {b['bpc']:.3f} bits/char: {diff:+.3f} ± {se:.3f} "
            f"({z:+.1f} SE), {words}.")


def verdicts(rows: list[dict]) -> list[str]:
    """Each DMB run against each baseline, then learned against frozen Q (same network and scaling)."""
    dmb = [r for r in rows if r["method"] == "dmb"]
    lines = [f"- {compare(r, b)}" for r in dmb for b in rows if b["method"] != "dmb"]
    learned = [r for r in dmb if r["learn_q"] and not r["scale_by_sigma"]]
    frozen = [r for r in dmb if not r["learn_q"] and not r["scale_by_sigma"]]
    if learned and frozen:
        lines.append(f"- Matrix learning on vs off: {compare(learned[0], frozen[0])}")
    for r in dmb:
        q = r["rates"]
        lines.append(f"- {r['label']}: Q after training has mean rate {q['absorbing_rate']:.3g} into the absorbing "
                     f"rank and {q['other_rate_mean']:.3g} (max {q['other_rate_max']:.3g}) into the others.")
    return lines


def results_table(cfg: DMBStudyConfig, results: StudyResults) -> str:
    """Markdown: the settings, the bound of every run, the verdicts, the plot and each run's samples."""
    rows, t = results.rows, cfg.train
    lines = [f"Data: {t.data} (validation windows of {t.seq_len} characters); model preset `{t.model}`; "
             f"{t.steps} score steps of batch {t.batch}, AdamW lr {t.lr:g} with the UBA schedule (φ = {t.phi:g}), "
             f"seed {cfg.seed}; DMB: matrix learning ({t.matrix_steps} steps) and p̂_0 "
             f"({t.p0_samples} samples × {t.p0_steps} Euler steps) every {t.outer_every} steps, except in "
             f"'dmb fixed Q', whose Q stays at the {t.init} init with p̂_0 = μ̂.", "",
             f"Bound in bits per character on {cfg.final_sequences} windows × {cfg.final_samples} Monte Carlo "
             "times each (± its Monte Carlo standard error; slimrate.dmb.elbo):", "",
             "| run | σ-scaled output | BPC bound | score term | prior term | train steps/s | parameters | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {'yes' if r['scale_by_sigma'] else 'no'} | {r['bpc']:.3f} ± {r['se']:.3f} "
                     f"| {r['score_bpc']:.3f} | {r['prior_bpc']:.4f} | {r['steps_per_s']:.1f} | {r['parameters']:,} "
                     f"| {r['minutes']:.1f} |")
    lines += ["", "Does the learned Q help at this scale?", "", *verdicts(rows), "",
              "Paper scale for context (text8, 92M-parameter net, 8 GPUs): DMB ≤ 1.38, SEDD-absorb ≤ 1.39, "
              "SEDD-uniform ≤ 1.47 (arXiv:2505.19752; docs/dmb.md §12).", "", "![BPC vs steps](dmb.png)", "",
              f"Samples ({cfg.sample_steps} Euler steps from the prior, EMA weights, seed {cfg.seed}; the baselines "
              "end with SEDD's denoising step, so no [MASK] is left):", ""]
    for r in rows:
        lines += [f"- {r['label']}:", *(f"  - `{text}`" for text in r["samples"])]
    return "\n".join(lines + [""])


def results_plot(cfg: DMBStudyConfig, results: StudyResults) -> bytes:
    """PNG: the bound against the score-learning steps, one curve per run."""
    from matplotlib.figure import Figure  # Agg rendering, no display

    rows = results.rows
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        steps = [p["step"] for p in r["curve"]]
        ax.errorbar(steps, [p["bpc"] for p in r["curve"]], yerr=[p["se"] for p in r["curve"]], marker="o",
                    markersize=3, capsize=2, label=r["label"])
    ax.set_xlabel("score-learning steps")
    ax.set_ylabel("bound (bits/char)")
    ax.set_title("DMB vs SEDD on the embedded corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return figure_png(fig)


STUDY = Study(name="dmb", help="DMB vs SEDD-absorb vs SEDD-uniform: bound in bits/char",
              title="DMB vs SEDD (absorb, uniform): bound in bits per character", stem="dmb", config=DMBStudyConfig,
              quick=quick_config, run_all=run_all, table=results_table, plot=results_plot)

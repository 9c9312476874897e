"""BackSlash in the fine-tuning setting: the char LM pretrained plainly, then fine-tuned with BackSlash.

Per seed: the plain run of the BackSlash study (``pretrain_steps`` steps, λ = 0) is the pretrained model.
From it, each arm fine-tunes for ``finetune_steps`` more steps (the next batches of the seed's data order,
a fresh AdamW at ``finetune_lr``), BackSlash in the decoupled mode with λ·f(k) at its step k (RateConstraint's
lam_schedule):
- "constant": f = 1;
- "linear_warmup": f ramps from 0 to 1 over the first ``warmup_share`` of the budget, then holds;
- "uba_shape": f follows the UBA learning-rate shape over the budget (``lam_schedules.uba_shape``, peak 1,
  φ = ``uba_phi``, no warm-up): from 1 down to 0 at the end;
- "recipe" (the authors' re-implementation): a BackSlash phase (f = 1) for ``recipe_share`` of the budget,
  then plain fine-tuning (f = 0).
Baselines: "plain" (the pretrained model), "plain finetune" (the same fine-tuning with λ = 0), and
"scratch" (BackSlash from scratch for pretrain_steps + finetune_steps steps, the study's recipe: equal
steps).  Every model is measured at each Δ of ``quant_steps``: the size–quality frontier is bits/char
after .slim against bits per weight over λ and Δ.  nncodec DQ of the plain weights joins when its venv
exists.  docs/backslash.md §11 describes the protocol.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from slimrate.backslash import RateConstraint
from slimrate.backslash.lam_schedules import constant, linear_warmup, uba_shape
from slimrate.files import figure_png
from slimrate.studies.backslash import add_nncodec_columns, default_peers_python, measure, runs_nncodec, train_steps
from slimrate.studies.backslash_report import FP32_BITS, QUALITY_BUDGET, SIZE_TARGET, error_bars, spread
from slimrate.studies.protocol import Study, StudyResults, seed_range
from slimrate.studies.tasks import TASKS, TaskConfig, quick_task_config

TASK = "charlm"
ARMS = ("constant", "linear_warmup", "uba_shape", "recipe")
PLAIN_ARMS = ("plain", "plain finetune")  # the baselines without BackSlash


@dataclass
class FinetuneStudyConfig:
    """The default took 29 minutes on 2 CPU cores shared with other work, one torch thread (the grids are
    small for that reason: two λ per arm, one from scratch)."""

    pretrain_steps: int = 2000  # the BackSlash study's char LM budget: its plain run is the pretrained model
    finetune_steps: int = 500
    finetune_lr: float = 1e-3  # a third of pretraining's constant 3e-3
    # Measured (seed 0, constant λ, 500 steps): λ = 5 gives 5.99 bits/w (rANS, Δ = 0.005) at 2.074 bits/char,
    # 20 gives 4.37 at 2.211, 60 gives 2.50 at 2.659 (plain fine-tuning: 6.88 at 2.035).
    lams: tuple[float, ...] = (5.0, 20.0)
    arms: tuple[str, ...] = ARMS
    warmup_share: float = 0.5
    uba_phi: float = 1.0  # φ < 2 holds λ high longer and drops it late (docs/uba.md)
    recipe_share: float = 0.6
    scratch_lams: tuple[float, ...] = (20.0,)
    quant_steps: tuple[float, ...] = (0.005, 0.01, 0.02)  # the study's Δ, then coarser
    seed: int = 0
    seed_count: int = 3
    eps: float = 1.0
    task_config: TaskConfig = field(default_factory=TaskConfig)
    peers_python: str | None = field(default_factory=default_peers_python)  # None: nncodec is not run

    def __post_init__(self) -> None:
        seed_range(self.seed, self.seed_count)  # checks seed_count
        unknown = [arm for arm in self.arms if arm not in ARMS]
        if unknown:
            raise ValueError(f"arms: expected names from {ARMS}, got {unknown}")

    @property
    def seeds(self) -> tuple[int, ...]:
        return seed_range(self.seed, self.seed_count)


def quick_config() -> FinetuneStudyConfig:
    """Seconds-long version for the tests: one seed, one λ, tiny budgets."""
    return FinetuneStudyConfig(pretrain_steps=30, finetune_steps=20, lams=(50.0,), scratch_lams=(50.0,),
                               quant_steps=(0.005, 0.01), seed_count=1, task_config=quick_task_config(),
                               peers_python=None)


def lam_factor(cfg: FinetuneStudyConfig, arm: str) -> Callable[[int], float]:
    """The arm's λ schedule for RateConstraint's lam_schedule: the factor f(k) at the constraint's step k."""
    steps = cfg.finetune_steps
    if arm == "constant":
        return constant()
    if arm == "linear_warmup":
        return linear_warmup(max(1, round(cfg.warmup_share * steps)))
    if arm == "uba_shape":
        return uba_shape(steps, cfg.uba_phi)
    phase = round(cfg.recipe_share * steps)  # "recipe": a BackSlash phase, then plain fine-tuning
    return lambda k: 1.0 if k < phase else 0.0


def measured_rows(cfg: FinetuneStudyConfig, task, model, base: dict) -> list[dict]:
    """One row per Δ of ``quant_steps``: ``base`` plus the sizes and quality at that Δ."""
    return [{**base, "quant_step": step, **measure(task, TASK, cfg.task_config, model, step)}
            for step in cfg.quant_steps]


def finetune(cfg: FinetuneStudyConfig, pretrained: dict[str, torch.Tensor], seed: int, arm: str, lam: float):
    """The pretrained model fine-tuned for finetune_steps with the arm's λ schedule; returns (task, model)."""
    task = TASKS[TASK](cfg.task_config, seed)
    model = task.model
    model.load_state_dict(pretrained)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=0.1, fused=True)
    hooks = []
    if lam > 0:
        hooks = [RateConstraint(model, lam=lam, eps=cfg.eps, mode="decoupled", lam_schedule=lam_factor(cfg, arm))]
    train_steps(task, model, optimizer, cfg.finetune_steps, seed, hooks, first_step=cfg.pretrain_steps)
    return task, model


def run_all(cfg: FinetuneStudyConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Per seed: pretrain, the plain fine-tuning, every arm × λ, and the from-scratch runs; rows per Δ."""
    runs_per_seed = 2 + len(cfg.arms) * len(cfg.lams) + len(cfg.scratch_lams)
    rows, plain_rows, plain_states = [], [], []
    with tqdm(total=runs_per_seed * len(cfg.seeds), desc="backslash finetune", unit="run",
              disable=not progress) as bar:
        for seed in cfg.seeds:
            task = TASKS[TASK](cfg.task_config, seed)
            train_steps(task, task.model, task.optimizer, cfg.pretrain_steps, seed, [])
            pretrained = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
            plain = measured_rows(cfg, task, task.model, {"arm": "plain", "lam": 0.0, "seed": seed})
            rows += plain
            plain_rows.append(plain[0])  # nncodec runs at the study's Δ
            plain_states.append(pretrained)
            bar.update()
            for arm, lam in [("plain finetune", 0.0)] + [(a, lam) for a in cfg.arms for lam in cfg.lams]:
                tuned_task, model = finetune(cfg, pretrained, seed, arm, lam)
                rows += measured_rows(cfg, tuned_task, model, {"arm": arm, "lam": lam, "seed": seed})
                bar.update()
            for lam in cfg.scratch_lams:
                task = TASKS[TASK](cfg.task_config, seed)
                train_steps(task, task.model, task.optimizer, cfg.pretrain_steps + cfg.finetune_steps, seed,
                            [RateConstraint(task.model, lam=lam, eps=cfg.eps, mode="decoupled")])
                rows += measured_rows(cfg, task, task.model, {"arm": "scratch", "lam": lam, "seed": seed})
                bar.update()
    nncodec = {}
    if runs_nncodec(cfg.peers_python):
        nncodec = add_nncodec_columns(cfg.peers_python, cfg.task_config, TASK, cfg.quant_steps[0], plain_rows,
                                      plain_states)
    return rows, {"nncodec": nncodec}


def frontier_groups(rows: list[dict]) -> dict[tuple[str, float, float], list[dict]]:
    """Rows grouped by (arm, λ, Δ) in run order, each group one row per seed."""
    groups: dict[tuple[str, float, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["lam"], r["quant_step"]), []).append(r)
    return groups


def best_bits(row: dict) -> float:
    return min(row["eg_bits"], row["rans_bits"])


def relative_loss(group: list[dict], reference: dict[int, float]) -> float:
    """Mean over seeds of the relative bits/char increase after .slim against ``reference[seed]``."""
    return statistics.fmean(r["val_bpc_slim"] / reference[r["seed"]] - 1 for r in group)


def target_lines(cfg: FinetuneStudyConfig, results: StudyResults) -> list[str]:
    """The size target against plain training and against plain fine-tuning; the nncodec DQ comparison."""
    groups = frontier_groups(results.rows)
    lines = []
    for name, arm, backslash in (("plain training (the pretrained model)", "plain", True),
                                 ("plain fine-tuning", "plain finetune", True),
                                 ("plain training, for reference without BackSlash (plain weights at any Δ)",
                                  "plain", False)):
        reference = {r["seed"]: r["val_bpc"] for r in results.rows if r["arm"] == arm}
        within = [(statistics.fmean(map(best_bits, g)), key) for key, g in groups.items()
                  if (key[0] not in PLAIN_ARMS) == backslash and relative_loss(g, reference) <= QUALITY_BUDGET]
        head = (f"Size target (a file ≥ {SIZE_TARGET:.0%} smaller than fp32 within +{100 * QUALITY_BUDGET:g}% "
                f"bits/char of {name}, mean over seeds)")
        if not within:
            lines.append(f"{head}: **missed**; no run stays within the budget.")
            continue
        bits, (arm_name, lam, step) = min(within)
        verdict = "**met**" if 1 - bits / FP32_BITS >= SIZE_TARGET else "**missed**"
        lines.append(f"{head}: {verdict}; the smallest within it is −{1 - bits / FP32_BITS:.1%} vs fp32 "
                     f"({bits:.2f} bits/w, {arm_name}, λ = {lam:g}, Δ = {step:g}).")
    points = [_smallest_no_worse(groups, key, g) for key, g in groups.items() if key[0] == "plain finetune"]
    lines.append("Against plain fine-tuning quantized coarser (each Δ's mean point; the smallest BackSlash run that is "
                 f"no worse in bits/char): {'; '.join(points)}.")
    dq = [r for r in results.rows if "nncodec_dq_bits" in r]
    if not dq:
        lines.append("Frontier against nncodec DQ of the plain weights: **not judged**, nncodec was not run.")
        return lines
    dq_bits, dq_bpc = statistics.fmean(r["nncodec_dq_bits"] for r in dq), statistics.fmean(r["val_bpc_nncodec_dq"]
                                                                                          for r in dq)
    below = [key for key, g in groups.items() if key[0] not in PLAIN_ARMS
             and statistics.fmean(map(best_bits, g)) < dq_bits
             and statistics.fmean(r["val_bpc_slim"] for r in g) <= dq_bpc]
    lines.append(f"Frontier below nncodec DQ of the plain weights ({dq_bits:.2f} bits/w at {dq_bpc:.4f} bits/char, "
                 f"mean): " + (f"**met** by {len(below)} runs, e.g. {below[0][0]} λ = {below[0][1]:g}, "
                               f"Δ = {below[0][2]:g}." if below else "**missed**: no run is both smaller and better."))
    return lines


def _smallest_no_worse(groups: dict, reference_key: tuple[str, float, float], reference: list[dict]) -> str:
    """"Δ = …: b bits/w at q → <the smallest BackSlash run with mean bits/char ≤ q, or none>"."""
    bpc = statistics.fmean(r["val_bpc_slim"] for r in reference)
    runs = [(statistics.fmean(map(best_bits, g)), key) for key, g in groups.items()
            if key[0] not in PLAIN_ARMS and statistics.fmean(r["val_bpc_slim"] for r in g) <= bpc]
    head = f"Δ = {reference_key[2]:g}: {statistics.fmean(map(best_bits, reference)):.2f} bits/w at {bpc:.4f}"
    if not runs:
        return f"{head} → no BackSlash run is as good"
    bits, (arm, lam, step) = min(runs)
    return f"{head} → {bits:.2f} bits/w ({arm}, λ = {lam:g}, Δ = {step:g})"


def results_table(cfg: FinetuneStudyConfig, results: StudyResults) -> str:
    """Markdown: the protocol line, the frontier table (mean (min–max) over seeds) and the targets."""
    seeds = ", ".join(map(str, cfg.seeds))
    plain_ref = {r["seed"]: r["val_bpc"] for r in results.rows if r["arm"] == "plain"}
    tuned_ref = {r["seed"]: r["val_bpc"] for r in results.rows if r["arm"] == "plain finetune"}
    lines = [f"Char LM pretrained plainly for {cfg.pretrain_steps} steps, fine-tuned for {cfg.finetune_steps} steps "
             f"(AdamW, lr {cfg.finetune_lr:g}), BackSlash decoupled, ε = {cfg.eps:g}; linear warm-up over "
             f"{cfg.warmup_share:.0%} of the fine-tuning, UBA shape φ = {cfg.uba_phi:g}, recipe: BackSlash for "
             f"{cfg.recipe_share:.0%}, then plain; scratch: BackSlash from scratch for "
             f"{cfg.pretrain_steps + cfg.finetune_steps} steps. Seeds {seeds}: mean (min–max). "
             "Δ vs plain / vs plain ft: mean relative change of bits/char after .slim against the plain model and "
             "against plain fine-tuning of the same seed. nncodec DQ (plain weights, Δ = "
             f"{cfg.quant_steps[0]:g}): " + (_nncodec_cell(results.rows) if results.facts["nncodec"] else
                                             "not run (no peers venv; `make peers`)."), "",
             "| arm | λ | Δ | bits/char after .slim | vs plain | vs plain ft | rANS (bits/w) | eg (bits/w) | "
             "best vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for (arm, lam, step), g in frontier_groups(results.rows).items():
        lines.append(f"| {arm} | {lam:g} | {step:g} | {spread([r['val_bpc_slim'] for r in g], '.4f')} | "
                     f"{100 * relative_loss(g, plain_ref):+.2f}% | {100 * relative_loss(g, tuned_ref):+.2f}% | "
                     f"{spread([r['rans_bits'] for r in g])} | {spread([r['eg_bits'] for r in g])} | "
                     f"−{spread([1 - best_bits(r) / FP32_BITS for r in g], '.1f', 100)}% |")
    return "\n".join(lines + ["", *target_lines(cfg, results)])


def _nncodec_cell(rows: list[dict]) -> str:
    dq = [r for r in rows if "nncodec_dq_bits" in r]
    return (f"{spread([r['nncodec_dq_bits'] for r in dq])} bits/w at "
            f"{spread([r['val_bpc_nncodec_dq'] for r in dq], '.4f')} bits/char.")


def results_plot(cfg: FinetuneStudyConfig, results: StudyResults) -> bytes:
    """PNG: the size–quality frontier, bits/char after .slim against rANS bits per weight, one line per
    (arm, λ) through its Δ values; means with min–max bars over the seeds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6), layout="constrained")
    ax = figure.subplots()
    lines: dict[tuple[str, float], list[list[dict]]] = {}
    for (arm, lam, _), g in frontier_groups(results.rows).items():
        lines.setdefault((arm, lam), []).append(g)
    for (arm, lam), groups in lines.items():
        xs, xerr = error_bars(groups, "rans_bits")
        ys, yerr = error_bars(groups, "val_bpc_slim")
        style = "k--" if arm.startswith("plain") else ("s:" if arm == "scratch" else "o-")
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=style, capsize=2, markersize=4,
                    label=arm if arm.startswith("plain") else f"{arm} λ={lam:g}")
    dq = [r for r in results.rows if "nncodec_dq_bits" in r]
    if dq:
        ax.plot([statistics.fmean(r["nncodec_dq_bits"] for r in dq)],
                [statistics.fmean(r["val_bpc_nncodec_dq"] for r in dq)], "r*", markersize=12,
                label="nncodec DQ, plain weights")
    plain = statistics.fmean(r["val_bpc"] for r in results.rows if r["arm"] == "plain")
    ax.axhline(plain * (1 + QUALITY_BUDGET), color="grey", linewidth=0.8, label="plain + 0.5%")
    ax.axvline(FP32_BITS * (1 - SIZE_TARGET), color="grey", linestyle=":", linewidth=0.8, label="−85% vs fp32")
    ax.set(xlabel="bits per weight (rANS .slim, tables included)", ylabel="val bits/char after .slim",
           title=f"Char LM: fine-tuning with BackSlash, Δ ∈ {{{', '.join(f'{s:g}' for s in cfg.quant_steps)}}}")
    ax.legend(fontsize=6, ncol=2)
    return figure_png(figure)


STUDY = Study(name="backslash-finetune", help="char LM: BackSlash fine-tuning of a plain model, λ schedules, frontier",
              title="BackSlash fine-tuning: size–quality frontier of the char LM", stem="backslash_finetune",
              config=FinetuneStudyConfig, quick=quick_config, run_all=run_all, table=results_table, plot=results_plot)

"""Budgeted-training study of learning-rate schedules: UBA for several φ against the usual baselines.

Two tasks (``slimrate.studies.tasks``: the digits MLP, the char LM), each at several step budgets, every
schedule with the same peak lr, optimizer, data order and seeds; the only difference between runs of one
(task, budget, seed) is the schedule.  Every schedule decays to min_lr = 0 at the budget with no warm-up,
except OneCycle, whose own warm-up (30% of the budget, torch's default) is part of what it is.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from slimrate.files import figure_png
from slimrate.schedules import make_schedule
from slimrate.studies.protocol import Study, StudyResults, seed_range
from slimrate.studies.tasks import PRIMARY, TASKS, TaskConfig, quick_task_config
from slimrate.train import TrainConfig, train


@dataclass
class SchedulesStudyConfig:
    """The default takes about 15 minutes on 2 CPU cores (the char LM dominates).  Each (task, budget,
    schedule) runs with seeds ``seed``, ``seed + 1``, … (``seed_count`` of them)."""

    budgets: tuple[int, ...] = (200, 600, 2000)
    seed: int = 0
    seed_count: int = 3
    phis: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
    baselines: tuple[str, ...] = ("cosine", "linear", "step", "wsd", "onecycle")
    tasks: tuple[str, ...] = ("digits", "charlm")
    task_config: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        seed_range(self.seed, self.seed_count)  # checks seed_count

    @property
    def seeds(self) -> tuple[int, ...]:
        return seed_range(self.seed, self.seed_count)


def quick_config() -> SchedulesStudyConfig:
    """A seconds-long version for the tests: two tiny budgets, one seed, fewer schedules, a tiny LM."""
    return SchedulesStudyConfig(budgets=(20, 60), seed_count=1, phis=(1.0, 2.0), baselines=("cosine", "wsd"),
                                task_config=quick_task_config())


def schedule_variants(cfg: SchedulesStudyConfig) -> list[tuple[str, dict]]:
    """(label, make_schedule kwargs incl. name) for every compared schedule."""
    ubas = [(f"uba φ={phi:g}", {"name": "uba", "phi": phi}) for phi in cfg.phis]
    return ubas + [(name, {"name": name}) for name in cfg.baselines]


def run_one(cfg: SchedulesStudyConfig, task_name: str, schedule: dict, budget: int, seed: int) -> dict[str, float]:
    """Train one (task, schedule, budget, seed) and return its final metrics."""
    task = TASKS[task_name](cfg.task_config, seed)
    kwargs = {k: v for k, v in schedule.items() if k != "name"}
    scheduler = make_schedule(schedule["name"], task.optimizer, budget, **kwargs)
    result = train(task.model, task.optimizer, task.loss_fn, task.get_batch,
                   TrainConfig(steps=budget, log_every=budget, seed=seed, progress=False, tensorboard=False),
                   scheduler=scheduler)
    return {"train_loss": result.loss, **task.metrics(task.model)}


def run_all(cfg: SchedulesStudyConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Every (task, budget, schedule, seed); one row each (no study-wide facts)."""
    runs = [(task, budget, label, schedule, seed) for task in cfg.tasks for budget in cfg.budgets
            for label, schedule in schedule_variants(cfg) for seed in cfg.seeds]
    rows = []
    for task, budget, label, schedule, seed in tqdm(runs, desc="schedule study", unit="run", disable=not progress):
        rows.append({"task": task, "budget": budget, "schedule": label, "seed": seed,
                     **run_one(cfg, task, schedule, budget, seed)})
    return rows, {}


def aggregate(rows: list[dict], task: str, metric: str) -> dict[tuple[int, str], tuple[float, float]]:
    """(budget, schedule) → (mean, std over seeds) of ``metric`` for ``task`` (std 0 for one seed)."""
    groups: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        if r["task"] == task:
            groups.setdefault((r["budget"], r["schedule"]), []).append(r[metric])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in groups.items()}


def results_table(cfg: SchedulesStudyConfig, results: StudyResults) -> str:
    """Markdown: per task, schedule rows × budget columns of mean ± std; the best mean per budget in bold."""
    rows, tasks = results.rows, cfg.task_config
    lines = [f"Seeds {list(cfg.seeds)}; peak lr digits {tasks.digits_lr:g} (Adam, batch {tasks.digits_batch}), "
             f"char LM {tasks.lm_lr:g} (AdamW wd 0.1, batch {tasks.lm_batch}, {asdict(tasks.lm)}); min_lr 0, no "
             "warm-up except OneCycle's own.", ""]
    labels = [label for label, _ in schedule_variants(cfg)]
    for task in cfg.tasks:
        metric, lower = PRIMARY[task]
        stats = aggregate(rows, task, metric)
        best = {b: (min if lower else max)(stats[(b, s)][0] for s in labels) for b in cfg.budgets}
        lines += [f"### {task}: {metric} ({'lower' if lower else 'higher'} is better), mean ± std", "",
                  "| schedule | " + " | ".join(f"{b} steps" for b in cfg.budgets) + " |",
                  "|---|" + "---|" * len(cfg.budgets)]
        for s in labels:
            cells = []
            for b in cfg.budgets:
                mean, std = stats[(b, s)]
                text = f"{mean:.4f} ± {std:.4f}"
                cells.append(f"**{text}**" if math.isclose(mean, best[b]) else text)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def results_plot(cfg: SchedulesStudyConfig, results: StudyResults) -> bytes:
    """PNG: per task, the primary metric (mean ± std over seeds) against the budget, one line per schedule."""
    from matplotlib.figure import Figure  # Agg rendering, no display

    rows = results.rows
    figure = Figure(figsize=(5.5 * len(cfg.tasks), 4.2), layout="constrained")
    axes = figure.subplots(1, len(cfg.tasks), squeeze=False)[0]
    for ax, task in zip(axes, cfg.tasks, strict=True):
        metric, _ = PRIMARY[task]
        stats = aggregate(rows, task, metric)
        for label, schedule in schedule_variants(cfg):
            means = [stats[(b, label)][0] for b in cfg.budgets]
            stds = [stats[(b, label)][1] for b in cfg.budgets]
            style = "-" if schedule["name"] == "uba" else "--"
            ax.errorbar(cfg.budgets, means, yerr=stds, linestyle=style, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("budget (steps)")
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.legend(fontsize=7)
    return figure_png(figure)


STUDY = Study(name="schedules", help="UBA vs baseline schedules at several budgets",
              title="Learning-rate schedules under a step budget", stem="schedules_study",
              config=SchedulesStudyConfig, quick=quick_config, run_all=run_all, table=results_table,
              plot=results_plot)

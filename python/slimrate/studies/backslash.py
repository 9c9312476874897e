"""BackSlash study: real .slim sizes over a λ sweep, against general-purpose coders, and pruning robustness.

For each task (the digits MLP, the char LM; see studies/schedules.py) and each λ (λ = 0 is plain
training) one model is trained with the same seed, data and budget, BackSlash in the decoupled mode
(papers/backslash.md §5b, ε = 1).  Its weight matrices are then quantized with the task's step Δ and
measured:
- size: the .slim file's weight payloads with the frequency-sorted exp-Golomb coder ("eg", the paper's
  Algorithm 2, table included) and with rANS, against fp32 storage and zstd (levels 3, 19) and lzma on
  the same int32 symbols; the empirical entropy H of the symbols is the bound for symbol-wise codes;
- quality after decompression (load_slim → the model's metrics);
- pruning: global magnitude pruning of the weight matrices at 0–95%, metrics after each.
"""

from __future__ import annotations

import lzma
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from slimrate.backslash import RateConstraint
from slimrate.backslash.metrics import slim_weight_bits, symbol_entropy_bits
from slimrate.ops import quantize
from slimrate.studies.output import figure_png, write_study_files
from slimrate.studies.schedules import PRIMARY, TASKS, StudyConfig
from slimrate.train import TrainConfig, train


@dataclass
class BackslashStudyConfig:
    """The default takes a few minutes on 2 CPU cores."""

    lams: tuple[float, ...] = (0.0, 10.0, 20.0, 50.0, 100.0, 200.0)
    tasks: tuple[str, ...] = ("digits", "charlm")
    steps: dict[str, int] = field(default_factory=lambda: {"digits": 1500, "charlm": 2000})
    quant_step: dict[str, float] = field(default_factory=lambda: {"digits": 0.01, "charlm": 0.005})
    prune_rates: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
    seed: int = 0
    eps: float = 1.0
    tasks_config: StudyConfig = field(default_factory=StudyConfig)  # models, lr, batch of each task


def quick_backslash_config() -> BackslashStudyConfig:
    """Seconds-long version for the tests."""
    from slimrate.studies.schedules import quick_config

    return BackslashStudyConfig(lams=(0.0, 50.0), steps={"digits": 60, "charlm": 30},
                                prune_rates=(0.0, 0.8), tasks_config=quick_config())


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float parameters with ≥ 2 dims, by state-dict name, each tied tensor once: what .slim quantizes."""
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def general_coder_bits(symbols: torch.Tensor) -> dict[str, float]:
    """Bits per symbol of zstd 3, zstd 19 and lzma (preset 6) on the little-endian int32 symbol bytes."""
    import zstandard

    raw = symbols.to(torch.int32).numpy().tobytes()
    n = symbols.numel()
    return {"zstd3": 8 * len(zstandard.ZstdCompressor(level=3).compress(raw)) / n,
            "zstd19": 8 * len(zstandard.ZstdCompressor(level=19).compress(raw)) / n,
            "lzma": 8 * len(lzma.compress(raw, preset=6)) / n}


def prune_(weights: list[torch.Tensor], rate: float) -> None:
    """Global magnitude pruning in place: zero the ``rate`` share of smallest |θ| over all weights."""
    if rate <= 0:
        return
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(rate * flat.numel())
    threshold = flat.kthvalue(max(k, 1)).values
    with torch.no_grad():
        for w in weights:
            w.masked_fill_(w.abs() <= threshold, 0.0)


def run_one(cfg: BackslashStudyConfig, task_name: str, lam: float) -> dict:
    """Train one model at λ and measure sizes, quality after decompression and the pruning curve."""
    task = TASKS[task_name](cfg.tasks_config, cfg.seed)
    model = task.model
    hooks = [RateConstraint(model, lam=lam, eps=cfg.eps, mode="decoupled")] if lam > 0 else []
    train(model, task.optimizer, task.loss_fn, task.get_batch,
          TrainConfig(steps=cfg.steps[task_name], log_every=cfg.steps[task_name], seed=cfg.seed, progress=False,
                      tensorboard=False), hooks=hooks)
    model.eval()
    metric, _ = PRIMARY[task_name]
    step = cfg.quant_step[task_name]
    weights = weight_matrices(model)
    names = list(weights)
    symbols = torch.cat([quantize(w.detach(), step).flatten() for w in weights.values()])
    row = {"task": task_name, "lam": lam, "params": symbols.numel(), metric: task.metrics(model)[metric],
           "entropy_bits": symbol_entropy_bits(symbols), **general_coder_bits(symbols)}
    for coder in ("eg", "rans"):
        bits, decoded = slim_weight_bits(model.state_dict(), names, step, coder)
        row[f"{coder}_bits"] = bits
        if coder == "eg":  # both coders are lossless on the symbols: one decoded model serves both
            restored = TASKS[task_name](cfg.tasks_config, cfg.seed).model
            restored.load_state_dict(decoded)
            restored.eval()
            row[f"{metric}_slim"] = task.metrics(restored)[metric]
    row["reduction_vs_fp32"] = 1 - row["eg_bits"] / 32
    curve = {}
    for rate in cfg.prune_rates:
        pruned = TASKS[task_name](cfg.tasks_config, cfg.seed).model
        pruned.load_state_dict(model.state_dict())
        pruned.eval()
        prune_(list(weight_matrices(pruned).values()), rate)
        curve[str(rate)] = task.metrics(pruned)[metric]
    row["pruning"] = curve
    return row


def run_backslash_study(cfg: BackslashStudyConfig, progress: bool = True) -> list[dict]:
    runs = [(task, lam) for task in cfg.tasks for lam in cfg.lams]
    return [run_one(cfg, task, lam) for task, lam in tqdm(runs, desc="backslash study", unit="run",
                                                          disable=not progress)]


def results_table(cfg: BackslashStudyConfig, rows: list[dict]) -> str:
    lines = []
    for task in cfg.tasks:
        metric, lower = PRIMARY[task]
        lines += [f"### {task}: Δ = {cfg.quant_step[task]:g}, {cfg.steps[task]} steps, seed {cfg.seed} "
                  f"({metric}: {'lower' if lower else 'higher'} is better)", "",
                  f"| λ | {metric} | {metric} after .slim | H (bits/w) | eg | rans | zstd-3 | zstd-19 | lzma | "
                  "eg vs fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["task"] == task):
            lines.append(f"| {r['lam']:g} | {r[metric]:.4f} | {r[metric + '_slim']:.4f} | {r['entropy_bits']:.3f} | "
                         f"{r['eg_bits']:.3f} | {r['rans_bits']:.3f} | {r['zstd3']:.3f} | {r['zstd19']:.3f} | "
                         f"{r['lzma']:.3f} | −{r['reduction_vs_fp32']:.1%} |")
        lines += ["", f"Pruning ({metric} after global magnitude pruning of the weight matrices):", "",
                  "| λ | " + " | ".join(f"{p:.0%}" for p in cfg.prune_rates) + " |",
                  "|---|" + "---|" * len(cfg.prune_rates)]
        for r in (r for r in rows if r["task"] == task):
            lines.append(f"| {r['lam']:g} | " + " | ".join(f"{r['pruning'][str(p)]:.4f}" for p in cfg.prune_rates)
                         + " |")
        lines.append("")
    lines.append("Sizes in bits per weight of the quantized weight matrices (payload; the eg column includes "
                 "its symbol table). eg vs fp32: 1 − eg/32.")
    return "\n".join(lines)


def results_plot(cfg: BackslashStudyConfig, rows: list[dict]) -> bytes:
    """PNG: per task, rate–quality (eg bits/weight vs metric after .slim) and the pruning curves."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4 * len(cfg.tasks)), layout="constrained")
    axes = figure.subplots(len(cfg.tasks), 2, squeeze=False)
    for (rate_ax, prune_ax), task in zip(axes, cfg.tasks, strict=True):
        metric, _ = PRIMARY[task]
        task_rows = [r for r in rows if r["task"] == task]
        rate_ax.plot([r["eg_bits"] for r in task_rows], [r[metric + "_slim"] for r in task_rows], "o-", label="eg")
        rate_ax.plot([r["rans_bits"] for r in task_rows], [r[metric + "_slim"] for r in task_rows], "s--",
                     label="rans")
        for r in task_rows:
            rate_ax.annotate(f"λ={r['lam']:g}", (r["eg_bits"], r[metric + "_slim"]), fontsize=7)
        rate_ax.set(xlabel="bits per weight", ylabel=f"{metric} after .slim", title=f"{task}: rate vs quality")
        rate_ax.legend(fontsize=7)
        for r in task_rows:
            prune_ax.plot([100 * p for p in cfg.prune_rates], [r["pruning"][str(p)] for p in cfg.prune_rates],
                          "o-" if r["lam"] else "k--", label=f"λ={r['lam']:g}")
        prune_ax.set(xlabel="weights pruned (%)", ylabel=metric, title=f"{task}: magnitude pruning")
        prune_ax.legend(fontsize=7)
    return figure_png(figure)


def write_backslash_study(cfg: BackslashStudyConfig, out_dir: str, progress: bool = True) -> list[Path]:
    """Run the study; write backslash.md, backslash.png and backslash.json atomically."""
    started = time.perf_counter()
    rows = run_backslash_study(cfg, progress=progress)
    note = f"Decoupled mode, ε = {cfg.eps:g}. nncodec (DeepCABAC) was not run.\n\n"
    config = {k: v for k, v in asdict(cfg).items() if k != "tasks_config"}
    return write_study_files(out_dir, "backslash", "BackSlash: .slim sizes, λ sweep and pruning", len(rows),
                             (time.perf_counter() - started) / 60, note + results_table(cfg, rows),
                             results_plot(cfg, rows), {"config": config, "rows": rows})

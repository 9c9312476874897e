"""BackSlash study: real .slim sizes over a λ sweep, against general-purpose coders, and pruning robustness.

For each task (the digits MLP, the char LM; ``slimrate.studies.tasks``) and each λ (λ = 0 is plain
training) one model is trained with the same seed, data and budget, BackSlash in the decoupled mode
(docs/backslash.md §4, ε = 1).  Its weight matrices are then quantized with the task's step Δ and
measured:
- size: the .slim file's weight payloads with the frequency-sorted exp-Golomb coder ("eg", the paper's
  Algorithm 2, table included) and with rANS, against fp32 storage and zstd (levels 3, 19) and lzma on
  the same int32 symbols; the empirical entropy H of the symbols is the bound for symbol-wise codes;
  nncodec (DeepCABAC) on the same float weights when its venv exists (bench/peers/nncodec_sizes.py,
  run in a subprocess: nncodec pins its own torch; `make peers` makes the venv);
- quality after decompression (load_slim → the model's metrics), and after nncodec's dependent quantization;
- pruning: global magnitude pruning of the weight matrices at 0–95%, metrics after each.
The study's targets are checked per task: ≥ 85% smaller than fp32 at ≤ 0.5 pt quality loss, and at
80% pruning ≤ 1 pt lost by BackSlash while plain training loses more (see ``quality_loss`` for bits/char).
"""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from slimrate.backslash import RateConstraint
from slimrate.backslash.metrics import slim_weight_bits, symbol_entropy_bits
from slimrate.files import figure_png
from slimrate.ops import quantize
from slimrate.sparse import prune_
from slimrate.studies.protocol import Study, StudyResults
from slimrate.studies.tasks import PRIMARY, TASKS, TaskConfig, quick_task_config
from slimrate.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[3]
NNCODEC_SCRIPT = REPO / "bench" / "peers" / "nncodec_sizes.py"
SIZE_TARGET = 0.85  # the target: ≥ 85% smaller than fp32 ...
QUALITY_BUDGET = 0.005  # ... at ≤ 0.5 pt quality loss (quality_loss's units)
PRUNING_BUDGET, PRUNING_RATE = 0.01, 0.8  # at 80% pruned BackSlash loses ≤ 1 pt, plain training more


def default_peers_python() -> str:
    """$SLIMRATE_PEERS_PYTHON, else the Python of the venv `make peers` creates (bench/.venv-peers)."""
    return os.environ.get("SLIMRATE_PEERS_PYTHON") or str(REPO / "bench" / ".venv-peers" / "bin" / "python")


@dataclass
class BackslashStudyConfig:
    """The default takes about 5 minutes on 2 CPU cores (the char LM runs dominate)."""

    # The LM loses quality at the digits' λ (val_bpc 2.13 → 2.30 at λ = 10), so its grid starts
    # 50× lower; measured (seed 0): λ = 0.2 costs 0.003 bits/char, 0.5 costs 0.02, 5 costs 0.07.
    lams: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "digits": (0.0, 10.0, 20.0, 50.0, 100.0, 200.0), "charlm": (0.0, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)})
    tasks: tuple[str, ...] = ("digits", "charlm")
    steps: dict[str, int] = field(default_factory=lambda: {"digits": 1500, "charlm": 2000})
    quant_step: dict[str, float] = field(default_factory=lambda: {"digits": 0.01, "charlm": 0.005})
    prune_rates: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
    seed: int = 0  # every run: weights and data order (one seed: the λ sweep is the comparison)
    eps: float = 1.0
    task_config: TaskConfig = field(default_factory=TaskConfig)  # models, lr, batch of each task
    peers_python: str | None = field(default_factory=default_peers_python)  # None: nncodec is not run


def quick_config() -> BackslashStudyConfig:
    """Seconds-long version for the tests."""
    return BackslashStudyConfig(lams={"digits": (0.0, 50.0), "charlm": (0.0, 50.0)}, steps={"digits": 60, "charlm": 30},
                                prune_rates=(0.0, 0.8), task_config=quick_task_config(), peers_python=None)


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


def fresh_model(cfg: BackslashStudyConfig, task_name: str, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The task's model in eval mode holding ``state_dict``."""
    model = TASKS[task_name](cfg.task_config, cfg.seed).model
    model.load_state_dict(state_dict)
    return model.eval()


def run_one(cfg: BackslashStudyConfig, task_name: str, lam: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train one model at λ, measure sizes, quality after decompression and the pruning curve;
    returns the row and the trained state dict."""
    task = TASKS[task_name](cfg.task_config, cfg.seed)
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
            row[f"{metric}_slim"] = task.metrics(fresh_model(cfg, task_name, decoded))[metric]
    row["reduction_vs_fp32"] = 1 - row["eg_bits"] / 32
    curve = {}
    for rate in cfg.prune_rates:
        pruned = fresh_model(cfg, task_name, model.state_dict())
        prune_(pruned, rate, include=lambda name, p: p.dim() >= 2)  # the weight matrices, globally
        curve[str(rate)] = task.metrics(pruned)[metric]
    row["pruning"] = curve
    return row, {k: v.detach().clone() for k, v in model.state_dict().items()}


def nncodec_sizes(python: str, weights: dict[str, torch.Tensor], step: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run bench/peers/nncodec_sizes.py with ``python`` (the peers venv) on ``weights`` at step Δ:
    its JSON (qp, step, per-mode bytes and max error; see the script) and the tensors its dependent
    quantization ("dq" mode) decodes to."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        weights_file, dq_file = Path(tmp) / "weights.safetensors", Path(tmp) / "dq.safetensors"
        save_file({name: w.detach().float().contiguous() for name, w in weights.items()}, weights_file)
        done = subprocess.run([python, str(NNCODEC_SCRIPT), str(weights_file), "--step", repr(step),
                               "--dq-out", str(dq_file)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{NNCODEC_SCRIPT} failed under {python} (exit {done.returncode}):\n"
                               f"{done.stderr[-2000:]}\nrepair the venv with `make peers`, or set peers_python=None")
        return json.loads(done.stdout.strip().splitlines()[-1]), load_file(dq_file)


def add_nncodec_columns(cfg: BackslashStudyConfig, task_name: str, rows: list[dict],
                        states: list[dict[str, torch.Tensor]]) -> dict:
    """Fill nncodec_bits, nncodec_dq_bits and <metric>_nncodec_dq in the task's rows (one nncodec call for
    all of them: its venv's torch takes seconds to import); returns nncodec's settings and max errors."""
    metric, _ = PRIMARY[task_name]
    task = TASKS[task_name](cfg.task_config, cfg.seed)
    models = [fresh_model(cfg, task_name, state) for state in states]
    keyed = {f"{i}/{name}": w for i, m in enumerate(models) for name, w in weight_matrices(m).items()}
    result, dq_decoded = nncodec_sizes(cfg.peers_python, keyed, cfg.quant_step[task_name])
    for i, (row, model) in enumerate(zip(rows, models, strict=True)):
        for mode, column in (("uniform", "nncodec_bits"), ("dq", "nncodec_dq_bits")):
            run_bytes = sum(n for key, n in result["modes"][mode]["bytes"].items() if key.startswith(f"{i}/"))
            row[column] = 8 * run_bytes / row["params"]
        with torch.no_grad():  # through the parameters, so tied weights get it once
            for name, w in weight_matrices(model).items():
                w.copy_(dq_decoded[f"{i}/{name}"])
        row[f"{metric}_nncodec_dq"] = task.metrics(model)[metric]
    return {"version": result["nncodec"], "qp": result["qp"], "qp_density": result["qp_density"],
            "step": result["step"], "max_abs_error": {mode: v["max_abs_error"] for mode, v in result["modes"].items()}}


def run_all(cfg: BackslashStudyConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """All runs' rows, and {"nncodec": per task nncodec's settings} ({} when its venv is absent or
    peers_python is None)."""
    rows, nncodec = [], {}
    run_nncodec = cfg.peers_python is not None and Path(cfg.peers_python).exists()
    with tqdm(total=sum(len(cfg.lams[t]) for t in cfg.tasks), desc="backslash study", unit="run",
              disable=not progress) as bar:
        for task_name in cfg.tasks:
            task_rows, states = [], []
            for lam in cfg.lams[task_name]:
                row, state = run_one(cfg, task_name, lam)
                task_rows.append(row)
                states.append(state)
                bar.update()
            if run_nncodec:
                nncodec[task_name] = add_nncodec_columns(cfg, task_name, task_rows, states)
            rows += task_rows
    return rows, {"nncodec": nncodec}


def quality_loss(task_name: str, reference: float, value: float) -> float:
    """Quality lost from ``reference`` to ``value``, in the targets' units: accuracy in points as a
    fraction (0.005 = 0.5 pt); bits/char, where no points exist, as the relative increase (0.005 =
    +0.5%, 2.13 → 2.14 bits/char)."""
    metric, lower_is_better = PRIMARY[task_name]
    return (value - reference) / reference if lower_is_better else reference - value


def best_slim_bits(row: dict) -> tuple[float, str]:
    """The smaller .slim payload of the row: (bits per weight, coder)."""
    return min((row["eg_bits"], "eg"), (row["rans_bits"], "rans"))


def target_lines(task_name: str, rows: list[dict]) -> list[str]:
    """The study's two targets checked on one task's rows (λ = 0 first): size at the quality budget,
    and pruning robustness (if 80% is among the pruning rates)."""
    metric, lower_is_better = PRIMARY[task_name]
    points = "% of" if lower_is_better else " pt of"  # quality_loss: relative for bits/char, points for accuracy
    plain = rows[0]
    within = [r for r in rows if quality_loss(task_name, plain[metric], r[metric + "_slim"]) <= QUALITY_BUDGET]
    head = (f"Size target (≥ {SIZE_TARGET:.0%} smaller than fp32 after .slim, losing ≤ "
            f"{100 * QUALITY_BUDGET:g}{points} {metric} vs plain training's {plain[metric]:.4f})")
    if within:
        bits, coder, lam = min((*best_slim_bits(r), r["lam"]) for r in within)
        verdict = "**met**" if 1 - bits / 32 >= SIZE_TARGET else "**missed**"
        lines = [f"{head}: {verdict}; within the budget the smallest is −{1 - bits / 32:.1%} vs fp32 "
                 f"({bits:.2f} bits/w, {coder}, λ = {lam:g})."]
    else:
        lines = [f"{head}: **missed**; no run stays within the quality budget."]
    key = str(PRUNING_RATE)
    if key in plain["pruning"] and "0.0" in plain["pruning"]:
        def loss(r: dict) -> float:
            return quality_loss(task_name, r["pruning"]["0.0"], r["pruning"][key])
        kept = [f"{r['lam']:g}" for r in rows[1:] if loss(r) <= PRUNING_BUDGET < loss(plain)]
        lines.append(f"Pruning target (at {PRUNING_RATE:.0%} pruned, BackSlash loses ≤ {100 * PRUNING_BUDGET:g}"
                     f"{points} its unpruned {metric}, plain training more; plain loses {100 * loss(plain):.1f}"
                     f"{points} it): "
                     + (f"**met** at λ = {', '.join(kept)}." if kept else "**missed** at every λ."))
    return lines


def cell(row: dict, key: str, fmt: str) -> str:
    """``row[key]`` formatted, or — where the column was not measured (nncodec not run)."""
    return format(row[key], fmt) if key in row else "—"


def results_table(cfg: BackslashStudyConfig, results: StudyResults) -> str:
    """Markdown: how nncodec ran, then per task the size/quality table, the pruning table and the targets."""
    rows = results.rows
    lines = [f"Decoupled mode, ε = {cfg.eps:g}. {nncodec_note(cfg, results.facts['nncodec'])}", ""]
    for task in cfg.tasks:
        metric, lower = PRIMARY[task]
        task_rows = [r for r in rows if r["task"] == task]
        lines += [f"### {task}: Δ = {cfg.quant_step[task]:g}, {cfg.steps[task]} steps, seed {cfg.seed} "
                  f"({metric}: {'lower' if lower else 'higher'} is better)", "",
                  f"| λ | {metric} | {metric} after .slim | H (bits/w) | eg | rans | zstd-3 | zstd-19 | lzma | "
                  f"nncodec | nncodec DQ | {metric} after DQ | eg vs fp32 |", "|---|" + "---|" * 12]
        for r in task_rows:
            lines.append(f"| {r['lam']:g} | {r[metric]:.4f} | {r[metric + '_slim']:.4f} | {r['entropy_bits']:.3f} | "
                         f"{r['eg_bits']:.3f} | {r['rans_bits']:.3f} | {r['zstd3']:.3f} | {r['zstd19']:.3f} | "
                         f"{r['lzma']:.3f} | {cell(r, 'nncodec_bits', '.3f')} | {cell(r, 'nncodec_dq_bits', '.3f')} | "
                         f"{cell(r, metric + '_nncodec_dq', '.4f')} | −{r['reduction_vs_fp32']:.1%} |")
        lines += ["", f"Pruning ({metric} after global magnitude pruning of the weight matrices):", "",
                  "| λ | " + " | ".join(f"{p:.0%}" for p in cfg.prune_rates) + " |",
                  "|---|" + "---|" * len(cfg.prune_rates)]
        for r in task_rows:
            lines.append(f"| {r['lam']:g} | " + " | ".join(f"{r['pruning'][str(p)]:.4f}" for p in cfg.prune_rates)
                         + " |")
        lines += ["", *target_lines(task, task_rows), ""]
    lines.append("Sizes in bits per weight of the quantized weight matrices (payload; the eg column includes "
                 "its symbol table; nncodec: whole bitstreams, one per tensor). eg vs fp32: 1 − eg/32.")
    return "\n".join(lines)


def nncodec_note(cfg: BackslashStudyConfig, nncodec: dict) -> str:
    """The header line saying how nncodec ran, or that it did not and how to make it run."""
    if not nncodec:
        why = f"no Python at {cfg.peers_python}" if cfg.peers_python else "peers_python=None"
        return (f"nncodec (DeepCABAC) was not run ({why}): `make peers` creates bench/.venv-peers, "
                "SLIMRATE_PEERS_PYTHON names another Python that has nncodec.")
    parts = [f"{task}: qp {v['qp']}, Δ' = {v['step']:.7g}, max |error| {v['max_abs_error']['uniform']:.4g} uniform, "
             f"{v['max_abs_error']['dq']:.4g} DQ" for task, v in nncodec.items()]
    version = next(iter(nncodec.values()))["version"]
    return (f"nncodec {version} (DeepCABAC, bench/peers/nncodec_sizes.py) on the same float weights, each tensor "
            f"its own bitstream, qp_density 7 and the qp whose step Δ' is nearest Δ ({'; '.join(parts)}). "
            "nncodec: uniform nearest-step quantization (use_dq=False), the same symbols as .slim up to Δ'/Δ, so "
            "a comparison of entropy coders; nncodec DQ: its default dependent quantization at the same qp, "
            "a coarser reconstruction (its quality in the next column).")


def results_plot(cfg: BackslashStudyConfig, results: StudyResults) -> bytes:
    """PNG: per task, rate–quality (bits/weight vs metric after decoding) and the pruning curves."""
    from matplotlib.figure import Figure

    rows = results.rows
    figure = Figure(figsize=(11, 4 * len(cfg.tasks)), layout="constrained")
    axes = figure.subplots(len(cfg.tasks), 2, squeeze=False)
    for (rate_ax, prune_ax), task in zip(axes, cfg.tasks, strict=True):
        metric, _ = PRIMARY[task]
        task_rows = [r for r in rows if r["task"] == task]
        curves = [("eg_bits", metric + "_slim", "o-", "eg"), ("rans_bits", metric + "_slim", "s--", "rans"),
                  ("nncodec_bits", metric + "_slim", "^:", "nncodec"),
                  ("nncodec_dq_bits", metric + "_nncodec_dq", "v:", "nncodec DQ")]
        for x, y, style, label in curves:
            if x in task_rows[0]:
                rate_ax.plot([r[x] for r in task_rows], [r[y] for r in task_rows], style, label=label)
        for r in task_rows:
            rate_ax.annotate(f"λ={r['lam']:g}", (r["eg_bits"], r[metric + "_slim"]), fontsize=7)
        rate_ax.set(xlabel="bits per weight", ylabel=f"{metric} after decoding", title=f"{task}: rate vs quality")
        rate_ax.legend(fontsize=7)
        for r in task_rows:
            prune_ax.plot([100 * p for p in cfg.prune_rates], [r["pruning"][str(p)] for p in cfg.prune_rates],
                          "o-" if r["lam"] else "k--", label=f"λ={r['lam']:g}")
        prune_ax.set(xlabel="weights pruned (%)", ylabel=metric, title=f"{task}: magnitude pruning")
        prune_ax.legend(fontsize=7)
    return figure_png(figure)


STUDY = Study(name="backslash", help="λ sweep: .slim sizes vs other coders, pruning",
              title="BackSlash: .slim sizes, λ sweep and pruning", stem="backslash", config=BackslashStudyConfig,
              quick=quick_config, run_all=run_all, table=results_table, plot=results_plot)

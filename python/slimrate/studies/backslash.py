"""BackSlash study: real .slim sizes over a λ sweep, against plain training coded the usual ways and other
coders, over several seeds, and pruning robustness.

For each task (the digits MLP, the char LM; ``slimrate.studies.tasks``), each λ (λ = 0 is plain training)
and each seed one model is trained with that seed's weights and data order and the same budget, BackSlash
in the decoupled mode (docs/backslash.md §4, ε = 1).  Its weight matrices are then quantized with the
task's step Δ and measured:
- size: a fixed-length code (``fixed_length_bits``, per tensor, table included), the .slim file's weight
  payloads with the frequency-sorted exp-Golomb coder ("eg", the paper's Algorithm 2, table included) and
  with rANS, zstd (levels 3, 19) and lzma on the same int32 symbols, the empirical entropy H (the bound of
  symbol-wise codes), and nncodec (DeepCABAC) on the same float weights when its venv exists
  (bench/peers/nncodec_sizes.py, run in a subprocess: nncodec pins its own torch; `make peers`);
- quality after decompression (load_slim → the model's metrics), and after nncodec's dependent quantization;
- pruning: global magnitude pruning of the weight matrices at 0–95%, metrics after each.
The paper's comparison (BackSlash + eg against plain training + fixed-length and + eg at the same Δ), the
targets and the tables are in ``slimrate.studies.backslash_report``; docs/backslash.md §10 defines them.
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
from slimrate.backslash.metrics import fixed_length_bits, slim_weight_bits, symbol_entropy_bits
from slimrate.ops import quantize
from slimrate.sparse import prune_
from slimrate.studies import backslash_report
from slimrate.studies.protocol import Study, seed_range
from slimrate.studies.tasks import PRIMARY, TASKS, Task, TaskConfig, quick_task_config
from slimrate.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[3]
NNCODEC_SCRIPT = REPO / "bench" / "peers" / "nncodec_sizes.py"


def default_peers_python() -> str:
    """$SLIMRATE_PEERS_PYTHON, else the Python of the venv `make peers` creates (bench/.venv-peers)."""
    return os.environ.get("SLIMRATE_PEERS_PYTHON") or str(REPO / "bench" / ".venv-peers" / "bin" / "python")


@dataclass
class BackslashStudyConfig:
    """The default took 35 minutes on 2 CPU cores shared with other work, one torch thread (the char LM
    runs dominate: 5 λ × 3 seeds).  Each (task, λ) runs with seeds ``seed``, ``seed + 1``, … (``seed_count``)."""

    # The LM loses quality at the digits' λ (val_bpc 2.13 → 2.30 at λ = 10), so its grid starts
    # 50× lower; measured (seed 0): λ = 0.2 costs 0.003 bits/char, 1 costs 0.03, 5 costs 0.07.
    lams: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "digits": (0.0, 10.0, 20.0, 50.0, 100.0, 200.0), "charlm": (0.0, 0.2, 1.0, 5.0, 20.0)})
    tasks: tuple[str, ...] = ("digits", "charlm")
    steps: dict[str, int] = field(default_factory=lambda: {"digits": 1500, "charlm": 2000})
    quant_step: dict[str, float] = field(default_factory=lambda: {"digits": 0.01, "charlm": 0.005})
    prune_rates: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
    seed: int = 0
    seed_count: int = 3
    eps: float = 1.0
    task_config: TaskConfig = field(default_factory=TaskConfig)  # models, lr, batch of each task
    peers_python: str | None = field(default_factory=default_peers_python)  # None: nncodec is not run

    def __post_init__(self) -> None:
        seed_range(self.seed, self.seed_count)  # checks seed_count

    @property
    def seeds(self) -> tuple[int, ...]:
        return seed_range(self.seed, self.seed_count)


def quick_config() -> BackslashStudyConfig:
    """Seconds-long version for the tests: one seed, two λ, tiny budgets."""
    return BackslashStudyConfig(lams={"digits": (0.0, 50.0), "charlm": (0.0, 50.0)}, steps={"digits": 60, "charlm": 30},
                                prune_rates=(0.0, 0.8), seed_count=1, task_config=quick_task_config(),
                                peers_python=None)


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


def fresh_model(task_config: TaskConfig, task_name: str, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The task's model in eval mode holding ``state_dict``."""
    model = TASKS[task_name](task_config, 0).model
    model.load_state_dict(state_dict)
    return model.eval()


def measure(task: Task, task_name: str, task_config: TaskConfig, model: nn.Module, step: float) -> dict:
    """Sizes of ``model``'s weight matrices quantized with step Δ = ``step`` (bits per weight: entropy,
    fixed-length, eg and rANS .slim payloads, zstd, lzma) and its metric before and after .slim."""
    model.eval()
    metric, _ = PRIMARY[task_name]
    weights = weight_matrices(model)
    per_tensor = [quantize(w.detach(), step).flatten() for w in weights.values()]
    symbols = torch.cat(per_tensor)
    row = {"params": symbols.numel(), metric: task.metrics(model)[metric], "entropy_bits": symbol_entropy_bits(symbols),
           "fixed_bits": sum(fixed_length_bits(q) * q.numel() for q in per_tensor) / symbols.numel(),
           **general_coder_bits(symbols)}
    for coder in ("eg", "rans"):
        bits, decoded = slim_weight_bits(model.state_dict(), list(weights), step, coder)
        row[f"{coder}_bits"] = bits
        if coder == "eg":  # both coders are lossless on the symbols: one decoded model serves both
            row[f"{metric}_slim"] = task.metrics(fresh_model(task_config, task_name, decoded))[metric]
    return row


def train_steps(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int,
                hooks: list, first_step: int = 0) -> None:
    """``steps`` optimizer steps on the task's batches ``first_step``, ``first_step + 1``, …"""
    def get_batch(step: int, rank: int, world_size: int):
        return task.get_batch(first_step + step, rank, world_size)

    train(model, optimizer, task.loss_fn, get_batch,
          TrainConfig(steps=steps, log_every=steps, seed=seed, progress=False, tensorboard=False), hooks=hooks)


def run_one(cfg: BackslashStudyConfig, task_name: str, lam: float, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train one model at λ with ``seed``, measure sizes, quality after decompression and the pruning curve;
    returns the row and the trained state dict."""
    task = TASKS[task_name](cfg.task_config, seed)
    model = task.model
    hooks = [RateConstraint(model, lam=lam, eps=cfg.eps, mode="decoupled")] if lam > 0 else []
    train_steps(task, model, task.optimizer, cfg.steps[task_name], seed, hooks)
    row = {"task": task_name, "lam": lam, "seed": seed,
           **measure(task, task_name, cfg.task_config, model, cfg.quant_step[task_name])}
    metric, _ = PRIMARY[task_name]
    curve = {}
    for rate in cfg.prune_rates:
        pruned = fresh_model(cfg.task_config, task_name, model.state_dict())
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


def runs_nncodec(peers_python: str | None) -> bool:
    """Whether a study with this ``peers_python`` runs nncodec: set, and the file exists."""
    return peers_python is not None and Path(peers_python).exists()


def add_nncodec_columns(peers_python: str, task_config: TaskConfig, task_name: str, step: float, rows: list[dict],
                        states: list[dict[str, torch.Tensor]]) -> dict:
    """Fill nncodec_bits, nncodec_dq_bits and <metric>_nncodec_dq in ``rows`` (one nncodec call for all of
    them: its venv's torch takes seconds to import); returns nncodec's settings and max errors."""
    metric, _ = PRIMARY[task_name]
    task = TASKS[task_name](task_config, 0)
    models = [fresh_model(task_config, task_name, state) for state in states]
    keyed = {f"{i}/{name}": w for i, m in enumerate(models) for name, w in weight_matrices(m).items()}
    result, dq_decoded = nncodec_sizes(peers_python, keyed, step)
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
    """All runs' rows (task, then λ, then seed), and {"nncodec": per task nncodec's settings} ({} when its
    venv is absent or peers_python is None)."""
    rows, nncodec = [], {}
    with tqdm(total=sum(len(cfg.lams[t]) for t in cfg.tasks) * len(cfg.seeds), desc="backslash study", unit="run",
              disable=not progress) as bar:
        for task_name in cfg.tasks:
            task_rows, states = [], []
            for lam in cfg.lams[task_name]:
                for seed in cfg.seeds:
                    row, state = run_one(cfg, task_name, lam, seed)
                    task_rows.append(row)
                    states.append(state)
                    bar.update()
            if runs_nncodec(cfg.peers_python):
                nncodec[task_name] = add_nncodec_columns(cfg.peers_python, cfg.task_config, task_name,
                                                         cfg.quant_step[task_name], task_rows, states)
            rows += task_rows
    return rows, {"nncodec": nncodec}


STUDY = Study(name="backslash", help="λ sweep over seeds: BackSlash vs plain training, .slim vs other coders, pruning",
              title="BackSlash: the paper's comparisons, .slim sizes, λ sweep and pruning", stem="backslash",
              config=BackslashStudyConfig, quick=quick_config, run_all=run_all, table=backslash_report.results_table,
              plot=backslash_report.results_plot)

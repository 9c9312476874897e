"""The main job (`slimrate demo`): BackSlash vs plain training of a small digits classifier.

Both runs share seed, model, data order, optimizer and step budget; the BackSlash run adds a
RateConstraint.  The table reports test accuracy (before and after quantizing the weights with the
stated step), the rate proxy R and shape ν̂ of the final weights, the share of near-zero weights,
and bits per parameter estimated as the empirical entropy of the quantized weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimrate.backslash import RateConstraint, estimate_shape, rate
from slimrate.backslash.metrics import quantized_entropy_bits, slim_weight_bits, small_weight_share
from slimrate.data.digits import load_digits_split
from slimrate.models.mlp import build_digits_mlp
from slimrate.train import TrainConfig, full_state_dict, is_sharded, shard_model, train

LOG_EVERY = 50  # steps per progress-bar update and log record
EVAL_POINTS = 10  # test-accuracy evaluations per run when metrics are written


@dataclass
class DemoConfig:
    """Defaults: 1500 Adam steps of batch 64 take about 3 s per run on 2 CPU cores.  λ = 50 in the
    decoupled mode shrinks each weight by λ·ν̂/N ≈ 1.4e-4 per step for this 84k-weight model (ν̂ ≈ 0.23
    late in training); λ is relative to N, so larger models need proportionally larger λ."""

    steps: int = 1500
    lam: float = 50.0
    seed: int = 0
    mode: str = "decoupled"
    eps: float = 1.0
    lr: float = 3e-3
    batch: int = 64
    hidden: int = 256
    quant_step: float = 0.01  # Δ for the entropy estimate and the quantized accuracy
    small: float = 1e-3  # |θ| below this counts as near zero
    out_dir: str | None = None  # metrics of each run (JSONL, TensorBoard) in out_dir/plain, out_dir/backslash
    wandb: bool = False  # also log to wandb in offline mode (needs out_dir and the wandb package)
    parallel: str = "ddp"  # under torchrun: "fsdp" shards the model with FSDP2 (docs/training.md §6)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def train_digits(cfg: DemoConfig, lam: float, label: str, out_dir: str | None = None) -> dict:
    """Train one classifier (BackSlash when lam > 0) with ``slimrate.train`` and measure it; returns
    one table row.  With ``out_dir``, metrics (and test accuracy every steps/10) go to its JSONL and
    TensorBoard files."""
    x_train, y_train, x_test, y_test = load_digits_split()
    torch.manual_seed(cfg.seed)
    model = build_digits_mlp(cfg.hidden)
    if cfg.parallel == "fsdp":
        shard_model(model)  # before the optimizer and the RateConstraint, which keep the parameters
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    hooks = [RateConstraint(model, lam=lam, eps=cfg.eps, mode=cfg.mode)] if lam > 0 else []
    # Row k holds step k's batch: the same draws, in the same order, as one generator read step by step.
    order = torch.randint(0, len(y_train), (cfg.steps, cfg.batch), generator=torch.Generator().manual_seed(cfg.seed))

    def get_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[step].tensor_split(world_size)[rank]
        return x_train[idx], y_train[idx]

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(net(x), y)

    def evaluate(net: nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(net, x_test, y_test)}

    config = TrainConfig(steps=cfg.steps, out_dir=out_dir, seed=cfg.seed, desc=label, log_every=LOG_EVERY,
                         wandb=cfg.wandb, parallel=cfg.parallel,
                         eval_every=max(cfg.steps // EVAL_POINTS, 1) if out_dir else 0)
    result = train(model, optimizer, loss_fn, get_batch, config, evaluate=evaluate, hooks=hooks)
    if is_sharded(model):  # the measurements below read whole weights
        whole = build_digits_mlp(cfg.hidden)
        whole.load_state_dict(full_state_dict(model))
        model = whole
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    nu = estimate_shape(weights)
    names = [name for name, p in model.named_parameters() if p.dim() >= 2]
    slim_bits, _ = slim_weight_bits(model.state_dict(), names, cfg.quant_step)
    row = {"run": label, "test_acc": result.eval["test_acc"], "slim_bits_per_param": slim_bits,
           "rate": float(rate([w.detach() for w in weights], nu, cfg.eps)), "nu": nu,
           "near_zero": small_weight_share(weights, cfg.small),
           "bits_per_param": quantized_entropy_bits(weights, cfg.quant_step)}
    with torch.no_grad():
        for w in weights:
            w.copy_(torch.round(w / cfg.quant_step) * cfg.quant_step)
    row["quant_acc"] = accuracy(model, x_test, y_test)
    return row


def run_demo(cfg: DemoConfig) -> dict:
    """Both runs and the settings, as a JSON-ready dict."""
    out_dirs = [str(Path(cfg.out_dir) / name) if cfg.out_dir else None for name in ("plain", "backslash")]
    rows = [train_digits(cfg, 0.0, "plain", out_dirs[0]),
            train_digits(cfg, cfg.lam, f"BackSlash λ={cfg.lam:g}", out_dirs[1])]
    return {"config": asdict(cfg), "rows": rows}


def format_table(result: dict) -> str:
    cfg = result["config"]
    head = (f"{'run':<18} {'test acc':>8} {'acc@Δ':>7} {'R':>8} {'ν̂':>5} "
            f"{'|θ|<' + format(cfg['small'], 'g'):>9} {'H bits/w':>8} {'.slim bits/w':>12}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['run']:<18} {r['test_acc']:>8.2%} {r['quant_acc']:>7.2%} {r['rate']:>8.4f} "
                     f"{r['nu']:>5.2f} {r['near_zero']:>9.1%} {r['bits_per_param']:>8.2f} "
                     f"{r['slim_bits_per_param']:>12.2f}")
    lines.append(f"digits MLP 64-{cfg['hidden']}-{cfg['hidden']}-10, {cfg['steps']} Adam steps (lr {cfg['lr']:g}, "
                 f"batch {cfg['batch']}), seed {cfg['seed']}, BackSlash mode={cfg['mode']} ε={cfg['eps']:g}.")
    lines.append(f"H bits/w: empirical entropy of the weight matrices quantized with step Δ={cfg['quant_step']:g}; "
                 ".slim bits/w: their real size in a .slim file (frequency-sorted exp-Golomb, table included); "
                 f"acc@Δ: test accuracy with those quantized weights; R, ν̂ at ε={cfg['eps']:g}.")
    return "\n".join(lines)

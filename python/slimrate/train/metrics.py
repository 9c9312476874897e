"""Metrics to a JSONL file, TensorBoard (offline event files) and, when asked, wandb in offline mode.

One JSONL record per log event: ``{"step": 20, "loss": ..., "lr": ..., "samples_per_s": ...}`` for
training, ``{"step": 20, "eval/accuracy": ...}`` for evaluation.  TensorBoard tags are the same
names, with training metrics under ``train/`` (``train/loss``, ``train/lr``, ``eval/accuracy``).

On resume from step s the JSONL file keeps only its records with step <= s (rewritten atomically)
and new records are appended, so no step appears twice; TensorBoard hides the events of the
interrupted run after step s (``SummaryWriter(purge_step=s + 1)``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from slimrate.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_INSTALL = "pip install wandb"


def check_wandb_installed() -> None:
    """Raise ImportError, naming the install command, when wandb is missing."""
    if importlib.util.find_spec("wandb") is None:
        raise ImportError(f"wandb=True (--wandb) needs the wandb package, which is not installed; "
                          f"install it with `{WANDB_INSTALL}` or leave wandb off (JSONL and TensorBoard "
                          "logs are always written)")


class MetricsLogger:
    """Writes metrics under ``out_dir``: ``metrics.jsonl``, ``tensorboard/`` and (wandb=True) ``wandb/``.

    start_step: the step training starts from (0, or the resumed checkpoint's step); records of a
    previous run after it are dropped.  config: a JSON-ready dict, given to wandb as the run config.
    """

    def __init__(self, out_dir: str | os.PathLike, *, start_step: int = 0, tensorboard: bool = True,
                 wandb: bool = False, config: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        _truncate_jsonl(self.path, start_step)
        self._jsonl = open(self.path, "a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: ~1 s, only when used

            self._tensorboard = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        self._wandb = None
        if wandb:
            check_wandb_installed()
            import wandb as wandb_module

            self._wandb = wandb_module.init(project="slimrate", name=self.out_dir.name, dir=str(self.out_dir),
                                            mode="offline", config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One record at ``step``: a line in the JSONL file, a scalar per metric elsewhere."""
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(name if "/" in name else f"train/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line cut short by a killed run is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

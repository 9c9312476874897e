"""The shared training loop: budget in steps, schedule, hooks, logging, checkpoint/resume, DDP."""

from slimrate.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from slimrate.train.distributed import DistributedInfo, init_distributed
from slimrate.train.loop import TrainConfig, TrainResult, train
from slimrate.train.metrics import MetricsLogger, read_jsonl
from slimrate.train.rng import rng_state, seed_everything, set_rng_state

__all__ = ["CheckpointError", "DistributedInfo", "MetricsLogger", "TrainConfig", "TrainResult",
           "init_distributed", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_jsonl", "rng_state",
           "save_checkpoint", "seed_everything", "set_rng_state", "train"]

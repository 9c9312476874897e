"""The shared training loop: budget in steps, schedule, hooks, logging, checkpoint/resume, DDP and FSDP2."""

from slimrate.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from slimrate.train.device import check_device
from slimrate.train.distributed import DistributedInfo, init_distributed
from slimrate.train.fsdp import full_state_dict, is_sharded, shard_model
from slimrate.train.loop import TrainConfig, TrainResult, train
from slimrate.train.metrics import MetricsLogger, read_jsonl
from slimrate.train.rng import rng_state, seed_everything, set_rng_state
from slimrate.train.sharded_checkpoint import verify_sharded_checkpoint

__all__ = ["CheckpointError", "DistributedInfo", "MetricsLogger", "TrainConfig", "TrainResult", "check_device",
           "full_state_dict", "init_distributed", "is_sharded", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "read_jsonl", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state",
           "shard_model", "train", "verify_sharded_checkpoint"]

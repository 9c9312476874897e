"""RateConstraintCallback in a transformers Trainer on a model sharded with FSDP2 at load time
(from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))), 2 CPU processes with gloo, through
bench/trainer_fsdp.py. (A model sharded with fully_shard before the Trainer is wrapped in DDP by accelerate on the
CPU, whose fsdp arguments it ignores there, and DDP's first broadcast fails on the DTensor parameters; on GPUs the
same script runs it through accelerate's FSDP2 plugin with --sharding self.)"""

import json
import re
from pathlib import Path

import pytest

from helpers import env_with_this_slimrate, finish_process, start_torchrun

SCRIPT = Path(__file__).parents[1] / "bench" / "trainer_fsdp.py"



def test_trainer_runs_the_callback_on_a_model_sharded_at_load_time(monkeypatch):
    pytest.importorskip("transformers.distributed", reason="transformers >= 5 shards models at load time")
    monkeypatch.setenv("PYTHONPATH", env_with_this_slimrate()["PYTHONPATH"])  # the workers import this slimrate
    proc = start_torchrun([str(SCRIPT), "--sharding", "load", "--device", "cpu", "--steps", "3"])
    out = finish_process(proc, "torchrun --nproc_per_node=2 bench/trainer_fsdp.py --sharding load")
    # each rank writes its line in one write; another rank's output may still precede it on the same line
    ranks = sorted((json.loads(found) for found in re.findall(r"trainer_fsdp: (\{.*\})$", out, re.M)),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["dtensor_params"], r
        assert len(r["backslash_rate"]) == 3 and None not in r["backslash_rate"] + r["backslash_nu"], r
    # R and ν are of the whole model, all-reduced: the same on both ranks, whose shards differ
    assert ranks[0]["backslash_rate"] == ranks[1]["backslash_rate"]
    assert ranks[0]["backslash_nu"] == ranks[1]["backslash_nu"]
    assert ranks[0]["loss"] == ranks[1]["loss"]

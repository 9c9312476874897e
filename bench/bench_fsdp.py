"""BackSlash's rate term under FSDP2: step time with and without it, its collectives' share, and the same rate
term computed by gathering full parameters.  bench/fsdp_rate_worker.py does the timing in 2 torchrun processes
(gloo on the CPU, NCCL on GPUs; its docstring says what each row is); this file starts it and records its
medians in extra_info (pytest-benchmark's own time is the whole torchrun run: start-up, model build, warm-up).
Each rank runs on one thread: the machine's cores are shared between the ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_rate_worker.py")
# (name, width, layers, rows per rank): the ≥ 100M-parameter model of the target with a small batch (the step is
# mostly FSDP's all-gathers and reduce-scatters, the rate term's worst case) and a larger one (more compute per
# step, as in real training), and a 4× smaller model
MODELS = [("mlp-101M-b16", 4096, 6, 16), ("mlp-101M-b256", 4096, 6, 256), ("mlp-25M-b16", 2048, 6, 16)]
RANKS = 2
TIMEOUT_S = 1200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name,width,layers,batch", MODELS, ids=[m[0] for m in MODELS])
def test_fsdp_rate_term(benchmark, tmp_path, name, width, layers, batch):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), "--out", str(out), "--width", str(width),
           "--layers", str(layers), "--batch", str(batch), "--rounds", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run_once() -> None:
        subprocess.run(cmd, check=True, env=env, timeout=TIMEOUT_S)

    benchmark.group = "fsdp-rate-term"
    benchmark.name = name
    benchmark.pedantic(run_once, rounds=1, iterations=1)
    benchmark.extra_info.update(json.loads(out.read_text()))

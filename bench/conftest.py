"""Benchmark collection and the machine facts every result table states.

pyproject's pytest settings collect tests/test_*.py; here bench/bench_*.py files are collected too,
so `pytest bench --benchmark-only` runs them without touching the test configuration.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import platform

import pytest
import torch

LOADAVG_AT_START = os.getloadavg()


def pytest_collect_file(file_path, parent):
    # pytest itself collects files named on the command line and files matching python_files;
    # collecting those here too would run every benchmark twice.
    if not (file_path.suffix == ".py" and file_path.name.startswith("bench_")):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _triton_version() -> str:
    try:  # the installed version, without importing triton (whose import reads TRITON_INTERPRET)
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["slimrate"] = {
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # other work on the machine skews CPU timings (OpenMP spin-waits suffer most): say how busy it was
        "loadavg_at_start": [round(x, 2) for x in LOADAVG_AT_START],
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }

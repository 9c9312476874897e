"""ExecuTorch programs for the checks of the C++ runner (tests/test_edge_runner.py, tools/edge_arm_check.py):
slimrate's models exported with ExecuTorch's own Python API, and slimrate_run called on raw .bin files
(docs/edge-runner.md)."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slimrate.models.char_lm import CharLM, CharLMConfig
from slimrate.models.mlp import DigitsMLP

ROOT = Path(__file__).resolve().parents[1]
HOST_RUNNER = ROOT / "build" / "edge" / "runner" / "slimrate_run"
BACKENDS = ("xnnpack", "portable")
# The d512 4-layer char transformer of bench/bench_sparse_e2e.py, one sequence of 128 ids.
CHARLM_D512 = CharLMConfig(context=128, d_model=512, n_heads=8, n_layers=4)


def digits(batch: int = 3) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The digits classifier (64-256-256-10) and a (batch, 64) float32 input."""
    return DigitsMLP().eval(), (torch.randn(batch, 64),)


def char_lm(cfg: CharLMConfig | None = None, batch: int = 1) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A char transformer (default config: 1 layer, d = 64, context 32) and (batch, context) int64 ids."""
    model = CharLM(cfg).eval()
    return model, (torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.context)),)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]] = {
    "digits": digits,
    "charlm": char_lm,
    "charlm-d512": lambda: char_lm(CHARLM_D512),
}


def export_program(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, backend: str) -> Path:
    """torch.export → to_edge_transform_and_lower → to_executorch, written to path. backend "xnnpack" lowers
    what XNNPACK supports to it; "portable" lowers nothing, so ExecuTorch's CPU kernels run every op."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(model, example)
    partitioner = [XnnpackPartitioner()] if backend == "xnnpack" else []
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=partitioner).to_executorch().buffer)
    return path


def eager_outputs(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[list, list]:
    """The model's outputs in float32 and, as the reference, in float64 (a copy run on float64 weights)."""
    with torch.no_grad():
        out32 = model(*example)
        ref64 = copy.deepcopy(model).double()(*(x.double() if x.is_floating_point() else x for x in example))
    return _as_list(out32), _as_list(ref64)


def _as_list(outputs) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def relative_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """‖out − ref₆₄‖ / ‖ref₆₄‖ in float64."""
    return ((out.double() - ref64).norm() / ref64.norm()).item()


def run_program(command: list[str], pte: Path, inputs: tuple[torch.Tensor, ...], like: list[torch.Tensor],
                folder: Path, *options: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, list]:
    """Runs `command pte --input ... --output ... options` (command: the runner, or qemu and the runner) on the
    inputs written as .bin files to folder; returns the process and, when it succeeded, its outputs read back
    with the dtypes and shapes of like."""
    args = [*command, str(pte)]
    for i, x in enumerate(inputs):
        path = folder / f"in{i}.bin"
        x.contiguous().numpy().tofile(path)
        args += ["--input", str(path)]
    outputs = [folder / f"out{j}.bin" for j in range(len(like))]
    for path in outputs:
        path.unlink(missing_ok=True)
        args += ["--output", str(path)]
    result = subprocess.run([*args, *options], capture_output=True, text=True, errors="replace", timeout=timeout)
    if result.returncode != 0:
        return result, []
    read = [torch.from_numpy(np.fromfile(path, dtype=y.numpy().dtype).reshape(y.shape))
            for path, y in zip(outputs, like, strict=True)]
    return result, read

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
from core_case_file import flash_tol, rel_err

from slimrate.models.char_lm import CharLM, CharLMConfig
from slimrate.models.mlp import DigitsMLP
from slimrate.sparse import SparseLinear, prune_, sparsify

ROOT = Path(__file__).resolve().parents[1]
HOST_RUNNER = ROOT / "build" / "edge" / "runner" / "slimrate_run"
BACKENDS = ("xnnpack", "portable")
# The d512 4-layer char transformer of bench/bench_sparse_e2e.py, one sequence of 128 ids.
CHARLM_D512 = CharLMConfig(context=128, d_model=512, n_heads=8, n_layers=4)
SPARSITY = 0.9
# The benchmarks' two sparse layouts: CSR of an unstructured pruning, and BSR of 8×1 blocks pruned as blocks.
LAYOUTS = {"csr": ("unstructured", "csr", None), "bsr8x1": ("block", "bsr", (8, 1))}


def digits(batch: int = 3) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The digits classifier (64-256-256-10) and a (batch, 64) float32 input."""
    return DigitsMLP().eval(), (torch.randn(batch, 64),)


def char_lm(cfg: CharLMConfig | None = None, batch: int = 1) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A char transformer (default config: 1 layer, d = 64, context 32) and (batch, context) int64 ids."""
    model = CharLM(cfg).eval()
    return model, (torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.context)),)


def pruned(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    """model with SPARSITY of each layer's weights zeroed by magnitude (layout "csr": single entries, "bsr8x1":
    8×1 blocks); in place, returned."""
    pattern, _, block = LAYOUTS[layout]
    prune_(model, SPARSITY, scope="layer", pattern=pattern, block=block or (1, 1))
    return model


def swapped(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    """model with every nn.Linear of ≥ 50% zeros replaced by a SparseLinear of layout; in place, returned."""
    _, fmt, block = LAYOUTS[layout]
    sparsify(model, 0.5, format=fmt, block=block, measure=False)
    return model


def sparse(built: tuple[torch.nn.Module, tuple[torch.Tensor, ...]],
           layout: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A (model, example) pair from the builders above with the model pruned and swapped to layout."""
    model, example = built
    return swapped(pruned(model, layout), layout), example


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]] = {
    "digits": digits,
    "charlm": char_lm,
    "charlm-d512": lambda: char_lm(CHARLM_D512),
    "digits-csr": lambda: sparse(digits(), "csr"),
    "charlm-csr": lambda: sparse(char_lm(batch=2), "csr"),
    "charlm-bsr8x1": lambda: sparse(char_lm(batch=2), "bsr8x1"),
    "charlm-d512-csr": lambda: sparse(char_lm(CHARLM_D512), "csr"),
}


def export_program(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, backend: str) -> Path:
    """slimrate.edge.export (torch.export → to_edge_transform_and_lower → to_executorch), written to path, for
    dense and sparse models alike, so the dense baselines get the same XNNPACK-delegated attention. backend
    "xnnpack" lowers what XNNPACK supports to it; "portable" lowers nothing, so ExecuTorch's CPU kernels run
    every op; SparseLinear layers stay slimrate::sparse_linear calls."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    import slimrate.edge

    return slimrate.edge.export(model, example, path, backend=backend)


def eager_outputs(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[list, list]:
    """The model's outputs in float32 and, as the reference, in float64 (a copy run on float64 weights, its
    SparseLinear layers as nn.Linear of their dense weights: slimrate's sparse kernels take no float64)."""
    with torch.no_grad():
        out32 = model(*example)
        ref64 = densified(copy.deepcopy(model)).double()(*(x.double() if x.is_floating_point() else x
                                                            for x in example))
    return _as_list(out32), _as_list(ref64)


def densified(model: torch.nn.Module) -> torch.nn.Module:
    """model with each SparseLinear replaced by an nn.Linear of its dense weight; in place, returned."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]:
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.weight.to_dense())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        model.set_submodule(name, linear)
    return model


def _as_list(outputs) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def error_and_bound(out: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    """out's relative error against ref64 and the flash-attention bound it must stay under: 2·(eager float32's
    error) + 4 ulps of float32. The runner's XNNPACK GEMMs and ExecuTorch's kernels sum in other orders than
    torch (measured: 1.1e-6 against eager's 5.3e-7 on the d512 char transformer, both backends)."""
    return rel_err(out, ref64), flash_tol(eager, ref64, torch.float32)


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

"""On edge devices: the d512 4-layer char transformer (as bench_sparse_e2e.py builds it, random init) pruned to
90% per layer, unstructured (CSR) and in 8×1 blocks (BSR 8×1, block-pruned), run five ways:

- slimrate-<layout>-runner (i): slimrate.edge.export (XNNPACK for the dense ops, slimrate::sparse_linear for the
  SparseLinear layers) run by the C++ runner slimrate_run (build/edge, `make edge`);
- xnnpack-dense-runner (ii): the same pruned model with its nn.Linear layers kept dense, exported for XNNPACK and
  run by the same runner;
- portable-dense-runner (iii): the dense model on ExecuTorch's own CPU kernels (no delegate), same runner;
- eager-dense (iv): the dense pruned model in eager PyTorch;
- slimrate-<layout>-python (v): eager PyTorch with SparseLinear layers on slimrate's torch kernels, the model
  slimrate.runtime.load gives with measure=False (every pruned layer swapped).

Shapes: sequences of 128 tokens ("seq128") and one-token calls ("tok1"), batch 1 and 8. The dense rows use the
CSR-pruned weights (a dense layer's time does not depend on where its zeros are).
Runner rows are timed by slimrate_run --bench N (its median and min over N calls after 3 warm-up calls, in
extra_info runner_median_ms / runner_min_ms; pytest-benchmark's own time for them is one whole process: load,
warm-up and the N calls). Every row runs on ONE thread (the runner's --threads 1 and OMP_NUM_THREADS=1 for the
kernels' OpenMP; torch.set_num_threads(1)): the machine's 2 cores are shared, and two-thread timings there are
erratic. Before timing, every row's output is checked against float64 within the tests' bound
(tests/test_edge_runner.py). extra_info file_bytes: the .pte's size, or the eager module's weight bytes.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from slimrate import runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import edge_programs as programs  # noqa: E402  (tools/ is not a package)

pytest.importorskip("executorch", reason="executorch is not installed (make edge installs it)")
pytestmark = pytest.mark.skipif(not programs.HOST_RUNNER.exists(), reason="build/edge is not built; run `make edge`")

THREADS = 1
SHAPES = [("seq128", 128, 1), ("seq128", 128, 8), ("tok1", 1, 1), ("tok1", 1, 8)]  # (name, tokens, batch)
# Calls timed by the runner per (backend kind, tokens): about 2-5 s each on this machine; portable kernels take
# seconds per 128-token call (and batch 8 at 128 tokens, ~8× that, is left out).
RUNS = {("sparse", 128): 20, ("xnnpack", 128): 20, ("portable", 128): 1,
        ("sparse", 1): 300, ("xnnpack", 1): 300, ("portable", 1): 20}
PYTHON_ROUNDS = {128: 10, 1: 200}
MEDIAN = re.compile(r"median ([0-9.]+) ms, min ([0-9.]+) ms")
_MODELS: dict[str, torch.nn.Module] = {}
_PTE: dict[tuple[str, str, int], Path] = {}


def models() -> dict[str, torch.nn.Module]:
    """{"dense": CSR-pruned dense, "csr": its SparseLinear twin, "bsr8x1-dense", "bsr8x1"}: one random init."""
    if not _MODELS:
        torch.manual_seed(0)
        base, _ = programs.char_lm(programs.CHARLM_D512)
        for layout, dense_name in (("csr", "dense"), ("bsr8x1", "bsr8x1-dense")):
            _MODELS[dense_name] = programs.pruned(copy.deepcopy(base), layout)
            _MODELS[layout] = programs.swapped(copy.deepcopy(_MODELS[dense_name]), layout)
    return _MODELS


def example(tokens: int, batch: int) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(tokens * 100 + batch)
    return (torch.randint(0, programs.CHARLM_D512.vocab_size, (batch, tokens), generator=gen),)


def pte(model_name: str, backend: str, x: tuple[torch.Tensor], folder: Path) -> Path:
    key = (model_name, backend, *x[0].shape)
    if key not in _PTE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the exporter's own deprecated torch internals
            path = folder / ("-".join(map(str, key)) + ".pte")
            _PTE[key] = programs.export_program(models()[model_name], x, path, backend)
    return _PTE[key]


def check_close(out: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str) -> float:
    err, bound = programs.error_and_bound(out, eager, ref64)
    assert err <= bound, f"{what}: rel err {err:.3g} > {bound:.3g} against float64"
    return err


ROWS = [("slimrate-csr-runner", "csr", "xnnpack"), ("slimrate-bsr8x1-runner", "bsr8x1", "xnnpack"),
        ("xnnpack-dense-runner", "dense", "xnnpack"), ("portable-dense-runner", "dense", "portable"),
        ("eager-dense", "dense", None), ("slimrate-csr-python", "csr", None),
        ("slimrate-bsr8x1-python", "bsr8x1", None)]


@pytest.mark.parametrize("row,model_name,backend", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("shape,tokens,batch", SHAPES, ids=[f"{s}-b{b}" for s, _, b in SHAPES])
def test_edge(benchmark, tmp_path_factory, shape, tokens, batch, row, model_name, backend):
    if backend == "portable" and tokens * batch > 128:
        pytest.skip("portable kernels: ~8× the seconds of one 128-token call; batch 8 × 128 tokens left out")
    torch.set_num_threads(THREADS)
    model, x = models()[model_name], example(tokens, batch)
    reference = models()["bsr8x1-dense" if model_name == "bsr8x1" else "dense"]
    out32, ref64 = programs.eager_outputs(reference, x)
    benchmark.group = f"edge-charlm-d512-{shape}-b{batch}"
    benchmark.name = row
    info = dict(backend=row, shape=shape, tokens=tokens, batch=batch, threads=THREADS)
    if backend is None:
        with torch.no_grad():
            info["rel_err"] = check_close(model(*x), out32[0], ref64[0], row)
            info["file_bytes"] = runtime.weight_bytes(model)
            benchmark.extra_info.update(info)
            benchmark.pedantic(model, args=x, rounds=PYTHON_ROUNDS[tokens], warmup_rounds=3)
        return
    path = pte(model_name, backend, x, tmp_path_factory.mktemp(row))
    runs = RUNS[("sparse" if model_name != "dense" else backend, tokens)]
    folder = tmp_path_factory.mktemp("io")
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # slimrate's kernels in the runner: OpenMP
    options = ("--threads", str(THREADS), "--bench", str(runs))

    def run_once():
        return programs.run_program([str(programs.HOST_RUNNER)], path, x, out32, folder, *options)

    result, outputs = benchmark.pedantic(run_once, rounds=1, iterations=1)
    assert result.returncode == 0, result.stderr
    info["rel_err"] = check_close(outputs[0], out32[0], ref64[0], row)
    median, fastest = map(float, MEDIAN.search(result.stdout).groups())
    info.update(file_bytes=path.stat().st_size, runner_runs=runs, runner_median_ms=median, runner_min_ms=fastest)
    benchmark.extra_info.update(info)

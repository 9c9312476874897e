"""slimrate_run, the C++ runner of edge/runner/ (docs/edge-runner.md), on programs exported with ExecuTorch's
own Python API (tools/edge_programs.py): its outputs equal eager PyTorch's on fresh random inputs, and a bad
program or input ends it with a clear message. `make test` builds it first (`make edge`)."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "build" / "edge" / "runner" / "slimrate_run"

pytest.importorskip("executorch", reason="executorch is not installed (make edge installs it)")
pytestmark = pytest.mark.skipif(not RUNNER.exists(), reason=f"{RUNNER.relative_to(ROOT)} is not built; run `make edge`")


@pytest.fixture(scope="module")
def programs():
    """tools/edge_programs.py, imported from its folder."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        yield importlib.import_module("edge_programs")
    finally:
        sys.path.remove(str(ROOT / "tools"))


@pytest.fixture(scope="module")
def digits_pte(programs, tmp_path_factory) -> tuple[Path, tuple, list]:
    """The digits classifier exported for XNNPACK, an input of batch 3, and its eager outputs."""
    model, example = programs.digits()
    path = tmp_path_factory.mktemp("digits") / "digits.pte"
    return programs.export_program(model, example, path, "xnnpack"), example, programs.eager_outputs(model, example)[0]


# Dense models, and pruned ones whose SparseLinear layers run on slimrate's kernels (CSR and BSR 8×1).
CASES = [("digits", "xnnpack"), ("digits", "portable"), ("charlm", "xnnpack"), ("charlm", "portable"),
         ("charlm-d512", "xnnpack"), ("digits-csr", "portable"), ("charlm-csr", "xnnpack"),
         ("charlm-csr", "portable"), ("charlm-bsr8x1", "xnnpack"), ("charlm-bsr8x1", "portable"),
         ("charlm-d512-csr", "xnnpack")]


@pytest.mark.parametrize("model_name,backend", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_runner_matches_eager(programs, tmp_path, model_name, backend):
    model, example = programs.MODELS[model_name]()
    pte = programs.export_program(model, example, tmp_path / "model.pte", backend)
    out32, ref64 = programs.eager_outputs(model, example)  # example: fresh random weights and inputs
    result, outputs = programs.run_program([str(RUNNER)], pte, example, out32, tmp_path, "--threads", "2")
    assert result.returncode == 0, result.stderr
    for j, (out, eager, ref) in enumerate(zip(outputs, out32, ref64, strict=True)):
        err, bound = programs.error_and_bound(out, eager, ref)
        assert err <= bound, f"output {j} {tuple(out.shape)} {out.dtype}: rel err {err:.3g} > {bound:.3g}, " \
                             f"max abs diff {(out - eager).abs().max():.3g} at {(out - eager).abs().argmax()}"


def test_runner_info_prints_dtype_and_shape(digits_pte):
    result = subprocess.run([str(RUNNER), str(digits_pte[0]), "--info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "input 0: float32 (3, 64), 768 bytes\noutput 0: float32 (3, 10), 120 bytes\n"


def test_runner_bench_prints_median_and_min(programs, digits_pte, tmp_path):
    pte, example, like = digits_pte
    result, _ = programs.run_program([str(RUNNER)], pte, example, like, tmp_path, "--bench", "3")
    assert result.returncode == 0, result.stderr
    assert "latency over 3 runs after 3 warm-up runs: median " in result.stdout, result.stdout


def test_runner_rejects_a_truncated_program(programs, digits_pte, tmp_path):
    pte, example, like = digits_pte
    data = pte.read_bytes()
    (tmp_path / "truncated.pte").write_bytes(data[: len(data) // 2])
    result, _ = programs.run_program([str(RUNNER)], tmp_path / "truncated.pte", example, like, tmp_path)
    assert result.returncode == 1
    assert "is not a valid ExecuTorch program: the file is corrupt, truncated or not a .pte" in result.stderr
    assert f"Expected file size from extended header is {len(data)}" in result.stderr, result.stderr


def test_runner_rejects_a_corrupt_program(programs, digits_pte, tmp_path):
    pte, example, like = digits_pte
    data = bytearray(pte.read_bytes())
    data[64:2000:7] = bytes(b ^ 0xFF for b in data[64:2000:7])  # the flatbuffer's tables, past the 64-byte header
    (tmp_path / "corrupt.pte").write_bytes(data)
    result, _ = programs.run_program([str(RUNNER)], tmp_path / "corrupt.pte", example, like, tmp_path)
    assert result.returncode == 1
    assert "is not a valid ExecuTorch program" in result.stderr and "Verification failed" in result.stderr, \
        result.stderr


def test_runner_rejects_an_input_of_the_wrong_size(programs, digits_pte, tmp_path):
    pte, example, like = digits_pte
    short = (example[0][:, :63],)
    result, _ = programs.run_program([str(RUNNER)], pte, short, like, tmp_path)
    assert result.returncode == 2
    assert "input 0" in result.stderr and "expected float32 (3, 64), 768 bytes, got 756 bytes" in result.stderr, \
        result.stderr


def test_runner_fails_cleanly_on_randomly_corrupted_programs(programs, digits_pte, tmp_path):
    """Random bytes overwritten anywhere in the program: the runner either runs or exits 1 with one error
    line, never dies on a signal."""
    pte, example, like = digits_pte
    data = pte.read_bytes()
    for case in range(30):
        corrupt = bytearray(data)
        span = 4096 if case % 2 else len(data)  # half of the cases hit the header and the first tables
        for position in torch.randint(0, span, (8,)).tolist():
            corrupt[position] = int(torch.randint(0, 256, ()).item())
        (tmp_path / "fuzzed.pte").write_bytes(corrupt)
        result, _ = programs.run_program([str(RUNNER)], tmp_path / "fuzzed.pte", example, like, tmp_path)
        assert result.returncode in (0, 1), f"case {case}: exit {result.returncode}\n{result.stderr}"
        if result.returncode == 1:
            assert result.stderr.startswith("slimrate_run: error: slimrate_edge_") and \
                result.stderr.count("\n") == 1, f"case {case}: {result.stderr}"

"""The C++ checks of the torch-free kernel core (csrc/tests/core_check.cpp), built with the host g++ as the
extension builds the core and with -DSLIMRATE_SCALAR, on cases that tools/core_cases.py writes from the
reference backend. `make test-arm` runs the same checks for aarch64 under qemu (tools/core_check.py --arm)."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimrate import ops

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")


@pytest.fixture(scope="module")
def tools():
    """tools/core_check.py and tools/core_cases.py, imported from their folder."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        yield importlib.import_module("core_check"), importlib.import_module("core_cases")
    finally:
        sys.path.remove(str(ROOT / "tools"))


@pytest.fixture(scope="module")
def cases(tools, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases")
    tools[1].write_cases(folder, seed=int(torch.randint(2**31, ()).item()))
    return folder


def run_core_check(binary: Path, cases: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(cases)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("build", ["core_check", "core_check_scalar"])
def test_core_matches_reference_on_every_case(tools, cases, build):
    result = run_core_check(tools[0].host_binaries()[build], cases)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASS ") == len(list(cases.glob("*.case"))) > 0


def test_core_check_fails_on_a_wrong_expected_output(tools, tmp_path):
    core_check, core_cases = tools
    params = core_cases.rate_params(torch.float32, [(7, 9)])
    grads = [torch.randn_like(p) for p in params]
    want = [g.double() for g in grads]
    r = ops.rate_grad_([p.double() for p in params], want, 1.0, 0.7, 1e-2, backend="reference")
    core_cases.write_case(tmp_path / "off-by-one.case", "rate_grad_", {
        "params.0": params[0], "grads.0": grads[0], "lam": 1.0, "nu": 0.7, "eps": 1e-2,
        "expected.r": r, "tol.r": 1e-6, "expected.grads.0": want[0] + 1.0, "tol.grads.0": 1e-6})
    result = run_core_check(core_check.host_binaries()["core_check"], tmp_path)
    assert result.returncode == 1
    assert "FAIL off-by-one: grads.0: rel err" in result.stdout, result.stdout


def test_core_check_fails_on_a_truncated_case_file(tools, cases, tmp_path):
    data = (cases / "rate_grad_-f32.case").read_bytes()
    (tmp_path / "truncated.case").write_bytes(data[: len(data) // 2])
    result = run_core_check(tools[0].host_binaries()["core_check"], tmp_path)
    assert result.returncode == 1
    assert "FAIL truncated:" in result.stdout and "truncated" in result.stdout.split(":", 1)[1], result.stdout


def test_core_check_fails_on_an_op_without_checker(tools, tmp_path):
    tools[1].write_case(tmp_path / "unknown.case", "no_such_op", {"x": 1.0})
    result = run_core_check(tools[0].host_binaries()["core_check"], tmp_path)
    assert result.returncode == 1
    assert "FAIL unknown: no checker for op 'no_such_op'" in result.stdout, result.stdout


def test_core_check_fails_on_a_folder_without_cases(tools, tmp_path):
    result = run_core_check(tools[0].host_binaries()["core_check"], tmp_path)
    assert result.returncode == 1
    assert "no .case files" in result.stderr

"""Cross-compiles the edge runtime (edge/: the C API, slimrate_run, and whatever else the project builds) for
aarch64 against the aarch64 executorch wheel, and runs slimrate_run under qemu-aarch64 on the same .pte files
as the host runner, comparing the outputs.

(a) The cross compiler and qemu: as tools/core_check.py --arm (apt-get installs them when missing; without
    apt-get or root it says so and exits 0, skipped).
(b) The aarch64 wheel of the installed executorch version: `pip download` into build/wheels/, unpacked (lib,
    include, share) into build/edge-aarch64-wheel/; where it cannot be downloaded it says so and exits 0.
(c) cmake with edge/aarch64-linux-gnu.cmake into build/edge-aarch64/.
(d) The digits classifier and a small char transformer, dense and pruned to 90% with slimrate's SparseLinear
    layers (CSR, and BSR of 8×1 blocks), exported for XNNPACK and for the portable kernels
    (tools/edge_programs.py), run by the host runner (build/edge, `make edge`) and under qemu: both must match
    eager PyTorch as in tests/test_edge_runner.py. Under qemu, time means nothing: correctness only.
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from core_check import ensure_arm_toolchain, find_qemu
from edge_programs import HOST_RUNNER, MODELS, ROOT, eager_outputs, error_and_bound, export_program, run_program

BUILD = ROOT / "build"
WHEEL_DIR = BUILD / "edge-aarch64-wheel"
CROSS_BUILD = BUILD / "edge-aarch64"
TOOLCHAIN = ROOT / "edge" / "aarch64-linux-gnu.cmake"
SYSROOT = "/usr/aarch64-linux-gnu"
# The venv's cmake when the edge extra installed one, else the one on PATH.
VENV_CMAKE = Path(sys.executable).with_name("cmake")
CMAKE = str(VENV_CMAKE) if VENV_CMAKE.exists() else "cmake"
WHEEL_PARTS = ("executorch/lib/", "executorch/include/", "executorch/share/")
BACKENDS = ("xnnpack", "portable")


def run(cmd: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def aarch64_package() -> Path | None:
    """build/edge-aarch64-wheel/executorch from the aarch64 wheel of the installed executorch (downloaded and
    unpacked when missing); None, after saying why, when it cannot be downloaded."""
    version = metadata.version("executorch")
    package = WHEEL_DIR / version / "executorch"
    if (package / "share" / "cmake" / "executorch-config.cmake").exists():
        return package
    wheels = BUILD / "wheels"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", f"executorch=={version}", "--no-deps", "--platform",
           "manylinux_2_28_aarch64", "--python-version", python, "--only-binary=:all:", "-d", str(wheels), "-q"]
    result = run(cmd)
    found = sorted(wheels.glob(f"executorch-{version}-*aarch64.whl"))
    if result.returncode != 0 or not found:
        print(f"SKIPPED the aarch64 runner: cannot download the aarch64 executorch {version} wheel "
              f"(`{' '.join(cmd[2:])}` said: {result.stderr.strip().splitlines()[-1:] or 'nothing'})")
        return None
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(WHEEL_DIR / version, [n for n in wheel.namelist() if n.startswith(WHEEL_PARTS)])
    return package


def cross_build(package: Path) -> bool:
    """Configures and builds edge/ for aarch64; prints the build's output on failure."""
    steps = [[CMAKE, "-S", "edge", "-B", str(CROSS_BUILD), f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN}",
              f"-DEXECUTORCH_DIR={package}"],
             [CMAKE, "--build", str(CROSS_BUILD), "-j", "2"]]
    for cmd in steps:
        result = run(cmd)
        if result.returncode != 0:
            print(f"FAIL  {' '.join(cmd)}\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
            return False
    built = sorted(p.name for p in CROSS_BUILD.rglob("*") if p.suffix == ".so" or p.name == "slimrate_run")
    print(f"-- aarch64 build of edge/ in {CROSS_BUILD.relative_to(ROOT)}: {', '.join(built)}")
    return True


def check_case(name: str, backend: str, folder: Path) -> bool:
    """One model × backend on the host runner and under qemu; both within the bound of eager float32."""
    model, example = MODELS[name]()
    pte = export_program(model, example, folder / f"{name}-{backend}.pte", backend)
    out32, ref64 = eager_outputs(model, example)
    runners = {"host": [str(HOST_RUNNER)],
               "qemu": [find_qemu(), "-L", SYSROOT, str(CROSS_BUILD / "runner" / "slimrate_run")]}
    outputs, ok = {}, True
    for where, command in runners.items():
        result, outputs[where] = run_program(command, pte, example, out32, folder)
        if result.returncode != 0:
            print(f"FAIL  {name}-{backend} on {where}: exit {result.returncode}\n{result.stderr}")
            ok = False
            continue
        for j, (out, eager, ref) in enumerate(zip(outputs[where], out32, ref64, strict=True)):
            err, bound = error_and_bound(out, eager, ref)
            if err > bound:
                print(f"FAIL  {name}-{backend} on {where}, output {j}: rel err {err:.3g} > {bound:.3g}")
                ok = False
    if ok:
        diff = max((a - b).abs().max().item() for a, b in zip(outputs["host"], outputs["qemu"], strict=True))
        print(f"ok    {name}-{backend}: host and aarch64 (qemu) match eager; max |host − aarch64| {diff:.3g}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        default=["digits", "charlm", "charlm-csr", "charlm-bsr8x1"],
                        help="models to export and run (charlm-d512: about 40 s of export, 30 s under qemu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models' weights and inputs")
    args = parser.parse_args()
    # The exporter warns about its own use of deprecated torch internals (LeafSpec), once per program.
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not ensure_arm_toolchain():
        return 0
    if not HOST_RUNNER.exists():
        print(f"FAIL  {HOST_RUNNER.relative_to(ROOT)} is not built; run `make edge` first")
        return 1
    package = aarch64_package()
    if package is None:
        return 0
    ok = cross_build(package)
    if ok:
        with tempfile.TemporaryDirectory(prefix="slimrate-edge-arm-") as folder:
            torch.manual_seed(args.seed)
            ok = all([check_case(name, backend, Path(folder)) for name in args.models for backend in BACKENDS])
    print("edge aarch64 checks: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

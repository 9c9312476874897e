"""The CUDA sources compile on a machine without a GPU (DESIGN.md "No GPU here").

Every torch-free csrc/cuda/*.cu is compiled with the local nvcc for each GPU architecture in ARCHS; the ATen glue
(csrc/cuda/*.cpp) is syntax-checked with g++ against the headers of the installed torch, which ship
ATen/cuda and c10/cuda even in CPU-only wheels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = sorted((CSRC / "cuda").glob("*.cu"))
GLUES = sorted((CSRC / "cuda").glob("*.cpp"))
NVCC = shutil.which("nvcc")
# Jetson Orin (edge boards), Ada (L4, L40S, RTX 40xx) and Hopper (H100/H200). One nvcc call per architecture
# costs about 2 s per file (three -gencode flags in one call would save a third of that, at the price of one
# test for all three).
ARCHS = ["sm_87", "sm_89", "sm_90"]


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h): $CUDA_HOME, next to nvcc, or /usr/local/cuda.
    nvcc may be a wrapper script (it is on the dev machines), so its own folder is not enough."""
    roots = [os.environ.get("CUDA_HOME"), NVCC and str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_cuda_kernel_compiles(source: Path, arch: str, tmp_path: Path):
    result = run([NVCC, "-c", f"-arch={arch}", "-std=c++17", "-I", str(CSRC), str(source),
                  "-o", str(tmp_path / (source.stem + ".o"))])
    assert result.returncode == 0, f"nvcc -arch={arch} failed on {source.name}:\n{result.stderr}"


@pytest.mark.skipif(cuda_include_dir() is None, reason="no CUDA toolkit headers next to nvcc")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("source", GLUES, ids=lambda p: p.name)
def test_cuda_glue_passes_syntax_check(source: Path):
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    # CPU-only torch wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h (it only sets
    # export macros); this define is c10's own switch for skipping it.
    result = run(["g++", "-fsyntax-only", "-std=c++17", *includes, f"-I{cuda_include_dir()}", f"-I{CSRC}",
                  "-DSLIMRATE_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", str(source)])
    assert result.returncode == 0, f"g++ -fsyntax-only failed on {source.name}:\n{result.stderr}"

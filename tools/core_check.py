"""Builds the C++ checks of the torch-free kernel core (csrc/core/, csrc/tests/) and runs them on cases that
tools/core_cases.py writes from the Python reference backend (seeded, fresh in a temporary folder).

--host  builds csrc/tests/core_check with the host g++ twice, with the extension's flags and with
        -DSLIMRATE_SCALAR (no x86 clones or intrinsics: the portable code other architectures run), and runs both.
--arm   (a) makes sure the aarch64 cross compiler and qemu-aarch64 are installed: apt-get installs Debian's
        g++-aarch64-linux-gnu and qemu-user when they are missing; without apt-get or root it says so and exits 0
        (skipped); (b) compiles every C++ file of the extension for aarch64 against torch's headers (a file
        outside AARCH64_FACES that fails is reported, not failed: its family is not ported yet); (c) builds
        core_check statically for aarch64 and runs it under qemu-aarch64 on the same cases.
Builds are cached in a temporary folder named by a hash of the sources and commands. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core_cases import write_cases

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CORE_SOURCES = sorted((CSRC / "core").glob("*.cpp"))
CHECK_SOURCES = sorted((CSRC / "tests").glob("*.cpp"))
# What the core's sources include: a change to any of them rebuilds core_check.
HEADERS = sorted([*(CSRC / "core").glob("*.h"), *(CSRC / "kernels").glob("*.h"), *(CSRC / "tests").glob("*.h")])
# The core's flags in setup.py: the vectoriser's results depend on them.
CORE_FLAGS = ["-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", f"-I{CSRC}"]
# The ATen faces of the extension that compile for aarch64: every csrc/core/*.cpp must as well. A kernel family
# ported onto csrc/core/ adds its csrc/cpu files here.
AARCH64_FACES = ["csrc/ops.cpp", "csrc/cpu/ctmc_autograd.cpp", "csrc/cpu/ctmc_cpu.cpp", "csrc/cpu/nf4_cpu.cpp",
                 "csrc/cpu/rate_cpu.cpp", "csrc/cpu/sparse_cpu.cpp"]
CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU_NAMES = ("qemu-aarch64", "qemu-aarch64-static")
APT_PACKAGES = ["g++-aarch64-linux-gnu", "qemu-user"]
# -O1: a real compile (target attributes are checked only when code is generated), a fifth faster than -O3
# (csrc/ops.cpp: 32 instead of 43 s of CPU).
AARCH64_COMPILE_FLAGS = ["-c", "-O1", "-w", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def build_dir(cmds: list[list[str]]) -> Path:
    """A cache folder for binaries built by cmds from the core's sources and headers."""
    digest = hashlib.sha256()
    for path in [*CORE_SOURCES, *CHECK_SOURCES, *HEADERS]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    for cmd in cmds:
        digest.update("\0".join(cmd).encode())
    folder = Path(tempfile.gettempdir()) / "slimrate-core-check" / digest.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build(builds: dict[str, list[str]]) -> dict[str, Path]:
    """Binaries {name: path} built with {name: compiler + flags}, each from the core and check sources, in
    parallel and only where the cache lacks them; raises RuntimeError with the compiler's output on failure."""
    folder = build_dir(list(builds.values()))
    binaries = {name: folder / name for name in builds}

    def compile_one(name: str) -> None:
        if binaries[name].exists():
            return
        partial = binaries[name].with_suffix(f".{os.getpid()}.tmp")  # renamed when complete: safe to share
        result = run([*builds[name], *map(str, CORE_SOURCES + CHECK_SOURCES), "-o", str(partial)])
        if result.returncode != 0:
            raise RuntimeError(f"building {name} failed:\n{result.stderr}")
        partial.replace(binaries[name])

    with ThreadPoolExecutor(len(builds)) as pool:
        list(pool.map(compile_one, builds))
    return binaries


def run_checks(name: str, cmd: list[str], cases: Path) -> bool:
    result = run([*cmd, str(cases)])
    print(f"-- {name}\n{result.stdout}{result.stderr}", end="")
    return result.returncode == 0


def host_binaries() -> dict[str, Path]:
    """core_check built as the extension builds the core, and with the portable (scalar) switch."""
    return build({"core_check": ["g++", "-O3", *CORE_FLAGS],
                  "core_check_scalar": ["g++", "-O3", "-DSLIMRATE_SCALAR", *CORE_FLAGS]})


def host_check(cases: Path) -> bool:
    binaries = host_binaries()
    ok = run_checks("host (x86 clones)", [str(binaries["core_check"])], cases)
    return run_checks("host, -DSLIMRATE_SCALAR (portable code)", [str(binaries["core_check_scalar"])], cases) and ok


def find_qemu() -> str | None:
    return next(filter(None, map(shutil.which, QEMU_NAMES)), None)


def ensure_arm_toolchain() -> bool:
    """True when the cross compiler and qemu are there (installing them with apt-get if needed); False when they
    cannot be installed here (no apt-get, or not root), after saying so."""
    if shutil.which(CROSS_CXX) and find_qemu():
        return True
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        print(f"SKIPPED the aarch64 checks: {CROSS_CXX} or qemu-aarch64 is missing and cannot be installed here "
              f"({'no apt-get' if shutil.which('apt-get') is None else 'not root'}); on Debian/Ubuntu run "
              f"`sudo apt-get install {' '.join(APT_PACKAGES)}`")
        return False
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        result = run(cmd, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")
    return True


def extension_sources() -> list[Path]:
    """Every C++ file setup.py compiles into the extension on a CPU build."""
    return [CSRC / "ops.cpp", *sorted((CSRC / "cpu").glob("*.cpp")), *CORE_SOURCES]


def aarch64_compile_check() -> bool:
    """Compiles each file of the extension for aarch64 against torch's and Python's headers; fails if a file of
    csrc/core or AARCH64_FACES does not compile."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    out = Path(tempfile.mkdtemp(prefix="slimrate-aarch64-"))

    def compile_one(source: Path) -> subprocess.CompletedProcess:
        return run([CROSS_CXX, *AARCH64_COMPILE_FLAGS, *CORE_FLAGS, *includes, str(source),
                    "-o", str(out / (source.stem + ".o"))])

    sources = extension_sources()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, sources))
    shutil.rmtree(out)
    ok = True
    print("-- aarch64 compile of the extension's C++ files")
    for source, result in zip(sources, results, strict=True):
        name = str(source.relative_to(ROOT))
        required = source in CORE_SOURCES or name in AARCH64_FACES
        if result.returncode == 0:
            print(f"ok    {name}" + ("" if required else "  (compiles now: add it to AARCH64_FACES)"))
            continue
        first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr[-300:])
        if required:
            ok = False
            print(f"FAIL  {name}\n{result.stderr}")
        else:
            print(f"not ported yet  {name}: {first_error.strip()}")
    return ok


def arm_check(cases: Path) -> bool:
    """Steps (b) and (c) of --arm; the caller has made sure of the toolchain."""
    compiled = aarch64_compile_check()
    # -O3 as setup.py: at -O2 GCC 12 leaves the kernel loops scalar, so qemu would not run the NEON code.
    binary = build({"core_check_aarch64": [CROSS_CXX, "-O3", "-static", *CORE_FLAGS]})["core_check_aarch64"]
    return run_checks("aarch64 under qemu", [find_qemu(), str(binary)], cases) and compiled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", action="store_true", help="build and run the checks with the host g++")
    parser.add_argument("--arm", action="store_true", help="aarch64: compile the extension, run the checks in qemu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated cases")
    args = parser.parse_args()
    if not (args.host or args.arm):
        parser.error("pass --host, --arm or both")
    if args.arm and not ensure_arm_toolchain():
        args.arm = False
        if not args.host:
            return 0
    with tempfile.TemporaryDirectory(prefix="slimrate-cases-") as folder:
        cases = Path(folder)
        write_cases(cases, args.seed)
        ok = True
        if args.host:
            ok = host_check(cases) and ok
        if args.arm:
            ok = arm_check(cases) and ok
    print("core checks: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Install slimrate's dependencies into the running (virtual) environment, offline-friendly.

torch: an installed torch >= 2.11 is kept, otherwise torch==2.13.0 (the CPU build on local disk; a bare
`torch` requirement would pull a multi-GB CUDA build).  triton: the version the installed torch expects.
Everything else: pyproject.toml's dependencies plus the extras used by tests and the demo.
"""

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

import tomllib

TORCH_PIN = "torch==2.13.0"
MIN_TORCH = (2, 11)
# CPU wheels of torch do not declare triton; these are the releases their CUDA twins pin.
TRITON_FOR_TORCH = {(2, 13): "triton==3.7.*"}
EXTRAS = ("triton", "hf", "qlora", "edge", "dev")


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args])


def installed_version(name: str) -> tuple[int, int] | None:
    try:
        major, minor = re.match(r"(\d+)\.(\d+)", metadata.version(name)).groups()
    except metadata.PackageNotFoundError:
        return None
    return int(major), int(minor)


def triton_requirement(torch_version: tuple[int, int]) -> str | None:
    declared = [r.split(";")[0].strip() for r in metadata.requires("torch") or [] if r.startswith("triton")]
    return declared[0] if declared else TRITON_FOR_TORCH.get(torch_version)


def main() -> None:
    torch_version = installed_version("torch")
    if torch_version is None or torch_version < MIN_TORCH:
        pip(TORCH_PIN)
        torch_version = installed_version("torch")
    project = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text())["project"]
    requirements = [r for r in project["dependencies"] if not r.startswith("torch")]
    for extra in EXTRAS:
        requirements += [r for r in project["optional-dependencies"][extra] if not r.startswith("triton")]
    triton = triton_requirement(torch_version)
    if triton:
        requirements.append(triton)
    else:
        print(f"note: no known triton release for torch {torch_version}; Triton kernels will be skipped")
    # The constraint keeps pip from replacing the installed torch while resolving the rest.
    constraint = Path(sys.prefix) / "torch-constraint.txt"
    constraint.write_text(f"torch=={metadata.version('torch')}\n")
    pip("-c", str(constraint), *requirements)


if __name__ == "__main__":
    main()

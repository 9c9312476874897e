"""Two builds of slimrate timed by the same benchmarks, side by side: a table of per-test medians and their ratio.

Each build is run several times, alternating (A, B, A, B, …) so that the machine's load drifts over both alike;
a test's time for one build is the smallest of its per-run medians (the run least disturbed by other jobs).

    python bench/compare_builds.py OUT.md --base NAME=A1.json,A2.json --new NAME=B1.json,B2.json

Rows whose code is the same in both builds (the dense and torch baselines) show how much the machine alone moves
a ratio between runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def medians(paths: list[Path]) -> tuple[dict[str, float], dict]:
    """{test name: smallest per-run median in ms} over the runs, and the first run's machine_info."""
    best: dict[str, float] = {}
    machine = {}
    for path in paths:
        run = json.loads(path.read_text())
        machine = machine or run.get("machine_info", {})
        for bench in run["benchmarks"]:
            ms = bench["stats"]["median"] * 1e3
            best[bench["fullname"]] = min(ms, best.get(bench["fullname"], ms))
    return best, machine


def build_arg(text: str) -> tuple[str, list[Path]]:
    name, _, files = text.partition("=")
    if not name or not files:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.json[,FILE.json…], got {text!r}")
    return name, [Path(f) for f in files.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", type=build_arg, required=True)
    parser.add_argument("--new", type=build_arg, required=True)
    parser.add_argument("--title", default="Two builds of slimrate, same benchmarks")
    args = parser.parse_args()
    (base_name, base_files), (new_name, new_files) = args.base, args.new
    base, machine = medians(base_files)
    new, _ = medians(new_files)
    info = machine.get("slimrate", {})
    names = [n for n in base if n in new]
    ratios = [new[n] / base[n] for n in names]
    lines = [f"# {args.title}", "",
             f"- CPU: {info.get('cpu_model', 'unknown')} ({info.get('nproc')} cores), torch threads "
             f"{info.get('torch_threads')}, torch {info.get('torch')}; {len(base_files)} runs of each build, "
             f"alternating; a cell is the smallest per-run median",
             f"- {base_name} vs {new_name}: {len(names)} tests; ratio {new_name}/{base_name}: median "
             f"{statistics.median(ratios):.3f}, range {min(ratios):.2f}–{max(ratios):.2f}", "",
             f"| test | {base_name} ms | {new_name} ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {n.split('::', 1)[-1]} | {base[n]:.4g} | {new[n]:.4g} | {new[n] / base[n]:.2f} |" for n in names]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:5]))


if __name__ == "__main__":
    main()

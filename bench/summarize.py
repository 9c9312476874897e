"""Turn a pytest-benchmark JSON file into a markdown table, one section per benchmark group.

    python bench/summarize.py bench/results/rate_grad.json bench/results/rate_grad.md

Per row: backend, median, IQR and min of the per-round time, speed-up over the group's `eager` and
`compile` rows (their median / this median; > 1 is faster), the time as a multiple of the group's `add`
row (this median / add's: 1.00× is the memory roofline), and GB/s = extra_info["bytes"] / median.
The header states the machine, torch/triton versions and date recorded in the JSON by
bench/conftest.py.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

BASELINES = ("eager", "compile", "dense")  # ratio columns, when the group has such a row


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


def fmt_ratio(baseline: float | None, median: float) -> str:
    return "—" if baseline is None else f"{baseline / median:.2f}×"


def header(data: dict) -> list[str]:
    machine = data.get("machine_info", {})
    facts = machine.get("slimrate", {})
    cpu = facts.get("cpu_model") or machine.get("cpu", {}).get("brand_raw", "unknown")
    lines = [
        "# Benchmark results",
        "",
        f"- machine: {cpu}, nproc {facts.get('nproc', '?')}, torch threads {facts.get('torch_threads', '?')}"
        + (f", GPU {facts['cuda']}" if facts.get("cuda") else ""),
        f"- torch {facts.get('torch', '?')}, triton {facts.get('triton', '?')}, "
        f"python {machine.get('python_version', '?')}",
        f"- date: {data.get('datetime', '?')}",
    ]
    for when in ("start", "end"):
        if f"loadavg_at_{when}" in facts:
            load = " / ".join(f"{x:.2f}" for x in facts[f"loadavg_at_{when}"])
            lines.append(f"- load average at {when} (1/5/15 min; {facts.get('nproc', '?')} fills the machine): {load}")
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    return lines + [""]


def group_table(name: str, rows: list[dict]) -> list[str]:
    medians = {r["extra_info"].get("backend"): r["stats"]["median"] for r in rows}
    first = rows[0]["extra_info"]
    lines = [f"## {name}", ""]
    if "params" in first:
        lines += [f"{first['params']:,} elements in {first.get('tensors', '?')} tensors, "
                  f"{first.get('dtype', '?')}, {first.get('device', '?')}", ""]
    columns = ["backend", "median", "IQR", "min", *(f"vs {b}" for b in BASELINES if b in medians),
               *(["time / add"] if "add" in medians else []), "GB/s", "rounds"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        info, stats = r["extra_info"], r["stats"]
        median = stats["median"]
        cells = [info.get("backend", r["name"]), fmt_time(median), fmt_time(stats["iqr"]), fmt_time(stats["min"])]
        cells += [fmt_ratio(medians[b], median) for b in BASELINES if b in medians]
        if "add" in medians:  # the memory-bound pass over the same bytes: 1.00× is the roofline
            cells.append(fmt_ratio(median, medians["add"]))
        cells.append(f"{info['bytes'] / median / 1e9:.1f}" if "bytes" in info else "—")
        cells.append(str(stats["rounds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def summarize(data: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    lines = header(data)
    for name, rows in groups.items():
        lines += group_table(name, rows)
    return "\n".join(lines)


def write_report(description: str, render: Callable[[dict], str]) -> str:
    """The command line of every report script: ``JSON MD`` arguments, ``render`` of the pytest-benchmark JSON
    written to MD atomically (a reader never sees half a table); returns the text."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("json_path", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("md_path", type=Path, help="markdown file to write")
    args = parser.parse_args()
    text = render(json.loads(args.json_path.read_text()))
    args.md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.md_path.with_suffix(args.md_path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.md_path)
    return text


def main() -> None:
    print(write_report(__doc__.splitlines()[0], summarize))


if __name__ == "__main__":
    main()

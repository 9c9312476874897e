"""Turn bench_edge.py's pytest-benchmark JSON into the tables of bench/results/edge.md.

    python bench/edge_report.py bench/results/edge.json bench/results/edge.md

One table per shape (sequences of 128 tokens or one-token calls, batch 1 or 8): per row the median and min
latency in ms (runner rows: slimrate_run --bench's own; the others: pytest-benchmark's rounds), the speed-up
over the dense XNNPACK program (its median / this median; > 1 is faster), the file size in MB (the .pte, or
the eager module's weights) and its share of the dense XNNPACK .pte's, and the relative error against float64.
"""

from __future__ import annotations

from summarize import header, write_report

BASELINE = "xnnpack-dense-runner"


def latency_ms(bench: dict) -> tuple[float, float, str]:
    """(median, min, how it was timed) of one row."""
    e = bench["extra_info"]
    if "runner_median_ms" in e:
        return e["runner_median_ms"], e["runner_min_ms"], f"slimrate_run --bench {e['runner_runs']}"
    s = bench["stats"]
    return s["median"] * 1e3, s["min"] * 1e3, f"pytest-benchmark, {s['rounds']} rounds"


def shape_table(group: str, rows: list[dict]) -> list[str]:
    first = rows[0]["extra_info"]
    what = "sequences of 128 tokens" if first["tokens"] == 128 else "one-token calls"
    base = next((r for r in rows if r["name"] == BASELINE), None)
    base_ms = latency_ms(base)[0] if base else None
    base_bytes = base["extra_info"]["file_bytes"] if base else None
    lines = [f"## {group}: batch {first['batch']}, {what}, {first['threads']} thread", "",
             "| row | median ms | min ms | vs xnnpack-dense | file MB | file vs xnnpack-dense | rel err | timed by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["extra_info"]
        median, fastest, how = latency_ms(r)
        speedup = f"{base_ms / median:.2f}×" if base_ms else "—"
        share = f"{e['file_bytes'] / base_bytes:.0%}" if base_bytes else "—"
        lines.append(f"| {r['name']} | {median:.3f} | {fastest:.3f} | {speedup} | {e['file_bytes'] / 1e6:.2f} | "
                     f"{share} | {e['rel_err']:.2g} | {how} |")
    return lines + [""]


def report(data: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    lines = header(data)
    for group, rows in groups.items():
        lines += shape_table(group, rows)
    return "\n".join(lines)


def main() -> None:
    write_report(__doc__.split("\n\n")[0], report)


if __name__ == "__main__":
    main()

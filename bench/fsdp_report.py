"""Turn bench_fsdp.py's pytest-benchmark JSON into bench/results/fsdp.md.

    python bench/fsdp_report.py bench/results/fsdp.json bench/results/fsdp.md

Per model: the median step time of plain training, with BackSlash's rate term (slimrate's DTensor-aware ops)
and with the rate term computed by gathering full parameters; the rate term's own median time and its share of the plain
step, the time it adds to the plain step (backslash step / plain step − 1; the target: ≤ 5% at ≥ 100M
parameters), the all_reduce calls inside it and their time.
"""

from __future__ import annotations

from summarize import header, write_report


def report(data: dict) -> str:
    lines = header(data) + [
        "",
        "BackSlash's rate term in an FSDP2 training step (bench/fsdp_rate_worker.py): medians over the timed rounds,",
        "one thread per rank. *backslash*: RateConstraint(mode=\"grad\", nu=\"auto\") on the sharded parameters;",
        "*gather*: the same rate term over full parameters gathered on every rank. The all_reduce time includes",
        "waiting for the slower rank.",
        "",
        "| model | params | ranks | batch/rank | plain step ms | backslash step ms | rate term ms "
        "| rate term / plain step | backslash / plain step − 1 "
        "| all_reduce calls (ms) | gather step ms | gather rate term ms | ours vs gather |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bench in data["benchmarks"]:
        e = bench["extra_info"]
        plain, ours, gather = e["plain"], e["backslash"], e["gather"]
        lines.append(
            f"| {bench['name']} | {e['num_params'] / 1e6:.1f}M | {e['world_size']} | {e['batch_per_rank']} "
            f"| {plain['step_ms']:.1f} | {ours['step_ms']:.1f} | {ours['rate_ms']:.1f} "
            f"| {ours['rate_ms'] / plain['step_ms']:.1%} | {ours['step_ms'] / plain['step_ms'] - 1:+.1%} "
            f"| {ours['all_reduce_calls']} ({ours['all_reduce_ms']:.2f}) "
            f"| {gather['step_ms']:.1f} | {gather['rate_ms']:.1f} | {gather['rate_ms'] / ours['rate_ms']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    write_report(__doc__.splitlines()[0], report)


if __name__ == "__main__":
    main()

"""Seeded fuzzing of the .slim reader and the coder ops: ``python tools/fuzz_slim.py --cases 140000`` (Linux).

Cases come from four families (tools/fuzz_slim_cases.py) and run in a pool of worker processes
(tools/fuzz_slim_worker.py), each with its address space capped; a worker that dies is a "crash", one that
spends more than --timeout seconds on a case is killed (a "hang"); both are respawned and go on with the
rest of their batch. The run writes OUT.json and OUT.md: per family the outcomes and a histogram of exception
types, and the failures grouped by kind, each kind with the reproducer of its first case, run again here with
``--case FAMILY:INDEX --seed SEED``; --save-failures DIR saves that case's input, run again with ``--replay FILE``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import wait
from pathlib import Path

import torch
from fuzz_slim_cases import FAMILIES, make_case
from fuzz_slim_files import seed_files
from fuzz_slim_worker import DOCUMENTED, FAILURES, LOADER_HAS_MAX_BYTES, load_seed_tensors, run_case, worker_main

START_TIMEOUT = 300.0  # seconds for a worker to import torch and build its seed files on a loaded machine
# Each case is written to a file: on tmpfs that takes ~40 µs, on this machine's disk ~4 ms (measured).
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None


class Worker:
    """One worker process and the batch it is running: cases[done:] are still to come."""

    def __init__(self, seed: int, max_bytes: int, cap_bytes: int, folder: str):
        ctx = multiprocessing.get_context("spawn")  # no fork of a parent that holds torch's threads
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, seed, max_bytes, cap_bytes, folder), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT) or self.conn.recv() != "ready":
            raise RuntimeError(f"a fuzz worker did not start within {START_TIMEOUT:.0f} s")
        self.cases, self.done, self.deadline = [], 0, 0.0

    def give(self, cases: list, timeout: float) -> None:
        self.cases, self.done, self.deadline = cases, 0, time.monotonic() + timeout
        self.conn.send(cases)

    def busy(self) -> bool:
        return self.done < len(self.cases)

    def next_result(self, ready: list, timeout: float) -> dict | None:
        """The current case's result; a "crash" or "hang" result when the worker died or ran past its deadline
        (it is then dead); None while the case runs."""
        family, index = self.cases[self.done]
        lost = {"family": family, "index": index, "exception": "", "growth": 0, "seconds": 0.0}
        if self.conn in ready:
            try:
                result = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(10)
                return {**lost, "outcome": "crash", "message": f"worker exit code {self.process.exitcode}"}
            self.done, self.deadline = self.done + 1, time.monotonic() + timeout
            return result
        if time.monotonic() > self.deadline and not self.conn.poll():  # poll: it may have answered since the wait
            self.stop(kill=True)
            return {**lost, "outcome": "hang", "message": f"no result within {timeout:g} s"}
        return None

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        else:
            self.conn.send(None)
        self.process.join(10)


def run_fuzz(seed: int, counts: dict[str, int], workers: int = 2, timeout: float = 10.0, max_bytes: int = 8 << 20,
             cap_bytes: int = 1 << 30, batch: int = 100, progress: int = 0) -> list[dict]:
    """Cases 0..counts[family]-1 of each family under ``seed``, on ``workers`` processes: one result per case
    (family, index, outcome, exception, message, growth, seconds). A worker that crashed or hung is replaced and
    the rest of its batch goes back in the queue. progress > 0: a line on stderr every ``progress`` cases."""
    todo = [[(family, i) for i in range(start, min(start + batch, n))]
            for family, n in counts.items() for start in range(0, n, batch)]
    todo.reverse()  # popped from the end: families in order
    results, start, total = [], time.monotonic(), sum(counts.values())
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        folders = [Path(tmp) / str(w) for w in range(workers)]
        for f in folders:
            f.mkdir()
        pool = [Worker(seed, max_bytes, cap_bytes, str(f)) for f in folders]
        while todo or any(w.busy() for w in pool):
            for w in pool:
                if not w.busy() and todo:
                    w.give(todo.pop(), timeout)
            busy = [w for w in pool if w.busy()]
            ready = wait([w.conn for w in busy], max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for k, w in enumerate(pool):
                result = w.next_result(ready, timeout) if w in busy else None
                if result is None:
                    continue
                results.append(result)
                if result["outcome"] in ("crash", "hang"):
                    pool[k] = Worker(seed, max_bytes, cap_bytes, str(folders[k]))
                    if w.cases[w.done + 1:]:
                        todo.append(w.cases[w.done + 1:])
                if progress and len(results) % progress == 0:
                    failed = sum(r["outcome"] in FAILURES for r in results)
                    print(f"{len(results)}/{total} cases, {failed} failed, "
                          f"{len(results) / (time.monotonic() - start):.0f} cases/s", file=sys.stderr, flush=True)
        for w in pool:
            w.stop(kill=False)
    return results


def summarize(results: list[dict], seed: int, seconds: float, workers: int, max_bytes: int) -> dict:
    """The run's figures: machine, per-family outcomes and exception types, failures by kind (family, outcome,
    exception type, message without names and numbers) with a count and the first case, and every failed case as
    [family, index, outcome, exception] (replayed with --seed SEED --case FAMILY:INDEX)."""
    families, kinds = {}, {}
    for family in dict.fromkeys(r["family"] for r in results):
        mine = [r for r in results if r["family"] == family]
        outcomes = Counter(r["outcome"] for r in mine)
        families[family] = {"cases": len(mine), **{o: outcomes[o] for o in ("loaded", "refused", *FAILURES)},
                            "exceptions": dict(Counter(r["exception"] for r in mine if r["exception"]).most_common()),
                            "max_rss_growth_mib": round(max(r["growth"] for r in mine) / 2**20, 1),
                            "ms_per_case": round(1000 * sum(r["seconds"] for r in mine) / len(mine), 2)}
    failures = sorted((r | {"seed": seed} for r in results if r["outcome"] in FAILURES),
                      key=lambda x: (x["family"], x["index"]))
    for x in failures:
        reason = re.sub(r"'[^']*'|-?\binf\b|\d+", "#", x["message"].split("\n")[0])[:80]  # names, numbers blanked
        kind = kinds.setdefault((x["family"], x["outcome"], x["exception"], reason), {"count": 0, "first": {
            k: x[k] for k in ("family", "index", "seed", "outcome", "exception", "message")}})
        kind["count"] += 1
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"seed": seed, "cases": len(results), "seconds": round(seconds, 1), "workers": workers,
            "cases_per_second": round(len(results) / seconds, 1), "cpu": cpu, "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "commit": commit, "torch": torch.__version__,
            "max_bytes": max_bytes, "loader_takes_max_bytes": LOADER_HAS_MAX_BYTES,
            "documented": {f: [t.__name__ for t in types] for f, types in DOCUMENTED.items()},
            "families": families, "failure_kinds": list(kinds.values()),
            "failures": [[x["family"], x["index"], x["outcome"], x["exception"]] for x in failures]}


def markdown(summary: dict) -> str:
    s = summary
    lines = [f"# .slim fuzzing: {s['cases']} cases, seed {s['seed']}", "",
             f"{s['cpu']}, {s['workers']} workers on {s['cores']} cores (load average at the end {s['load_average']}),"
             f" torch {s['torch']}, commit {s['commit']}: {s['seconds']} s, {s['cases_per_second']} cases/s. Loads "
             f"with max_bytes={s['max_bytes']} ({'passed to' if s['loader_takes_max_bytes'] else 'not taken by'} "
             f"load_slim). Documented exception types: {s['documented']}, and TypeError for a stream call with an "
             "argument of the wrong type.", "",
             "| family | cases | loaded | refused | crashes | hangs | memory blow-ups | undocumented exceptions "
             "| undetected corruptions | wrong results | max RSS growth (MiB) | ms/case |", "|---" * 12 + "|"]
    lines += [f"| {family} | {f['cases']} | {f['loaded']} | {f['refused']} | " + " | ".join(
        str(f[o]) for o in FAILURES) + f" | {f['max_rss_growth_mib']} | {f['ms_per_case']} |"
        for family, f in s["families"].items()]
    lines += ["", "Exception types: " + "; ".join(
        f"{family}: " + ", ".join(f"{t} {n}" for t, n in f["exceptions"].items()) for family, f in
        s["families"].items()), "", f"Failures by kind ({len(s['failure_kinds'])}), each with its first reproducer "
              "(`python tools/fuzz_slim.py --seed SEED --case FAMILY:INDEX`):", "",
              "| family | outcome | exception | cases | first | message |", "|---" * 6 + "|"]
    lines += [f"| {k['first']['family']} | {k['first']['outcome']} | {k['first']['exception']} | {k['count']} | "
              f"{k['first']['family']}:{k['first']['index']} | "
              + re.sub(r"\s+", " ", k["first"]["message"][:200]).replace("|", "/") + " |" for k in s["failure_kinds"]]
    return "\n".join(lines) + "\n"


def save_failures(summary: dict, folder: Path) -> list[Path]:
    """The input of the first failure of each kind, as FAMILY-SEED-INDEX.slim (a .slim file) or .json (an op
    call)."""
    folder.mkdir(parents=True, exist_ok=True)
    files, saved = seed_files(), []
    for x in (kind["first"] for kind in summary["failure_kinds"]):
        path = folder / f"{x['family']}-{x['seed']}-{x['index']}.{'json' if x['family'] == 'stream' else 'slim'}"
        path.write_bytes(make_case(x["family"], x["seed"], x["index"], files).data)
        saved.append(path)
    return saved


def replay(case, max_bytes: int) -> int:
    """Run one case here, without a memory cap or time limit, and print its outcome."""
    files = seed_files()
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        outcome, message, exception = run_case(case, Path(tmp), max_bytes, load_seed_tensors(files, Path(tmp)))
    print(f"{case.family} case {case.index} (seed {case.seed}, from {case.origin}): {outcome} {exception} {message}")
    return 1 if outcome in FAILURES else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=140000, help="total cases, shared out by --mix")
    p.add_argument("--mix", default="bytes=1,header=1,payload=1,stream=1", help="family=weight,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    p.add_argument("--max-bytes", type=int, default=8 << 20, help="load_slim's max_bytes where it takes one")
    p.add_argument("--memory-cap-mb", type=int, default=1024, help="address space each worker may add")
    p.add_argument("-o", "--output", default="bench/results/fuzz", help="writes OUTPUT.json and OUTPUT.md")
    p.add_argument("--save-failures", type=Path, help="folder for the first failing input of each kind")
    p.add_argument("--case", help="FAMILY:INDEX: run that case of --seed here and print the outcome")
    p.add_argument("--replay", type=Path, help="a saved FAMILY-SEED-INDEX.slim/.json: run it here")
    args = p.parse_args(argv)
    if args.case or args.replay:
        name = args.case or args.replay.stem
        m = re.fullmatch(r"(\w+)[:-](?:(\d+)-)?(\d+)", name)
        if not m or m.group(1) not in FAMILIES:
            p.error(f"expected FAMILY:INDEX or a FAMILY-SEED-INDEX file with FAMILY in {FAMILIES}, got {name!r}")
        case = make_case(m.group(1), int(m.group(2) or args.seed), int(m.group(3)), seed_files())
        if args.replay:
            case.data = args.replay.read_bytes()
        return replay(case, args.max_bytes)
    weights = {f: float(w) for f, w in (item.split("=") for item in args.mix.split(","))}
    if not set(weights) <= set(FAMILIES):
        p.error(f"--mix: families are {FAMILIES}, got {sorted(weights)}")
    counts = {f: round(args.cases * w / sum(weights.values())) for f, w in weights.items()}
    start = time.perf_counter()
    results = run_fuzz(args.seed, counts, args.workers, args.timeout, args.max_bytes, args.memory_cap_mb << 20,
                       progress=10000)
    summary = summarize(results, args.seed, time.perf_counter() - start, args.workers, args.max_bytes)
    if args.save_failures:
        summary["saved"] = [str(path) for path in save_failures(summary, args.save_failures)]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(summary, indent=1) + "\n")
    Path(args.output + ".md").write_text(markdown(summary))
    print(markdown(summary), end="")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

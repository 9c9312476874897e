"""What every study is: a config dataclass (its default is the full study, ``quick()`` a seconds-long
version), ``run(config)`` returning the results and ``write(config, results, out_dir)`` storing them as
a markdown table with a provenance line, a PNG plot and a JSON of every run."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

from slimrate.files import write_bytes_atomic, write_text_atomic

C = TypeVar("C")  # a study's config dataclass; every one has ``seed: int``, the base seed of its runs


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                        "unknown CPU")
    except OSError:
        return "unknown CPU"


def seed_range(seed: int, seed_count: int) -> tuple[int, ...]:
    """The seeds of a study that repeats each run: ``seed``, ``seed + 1``, … (``seed_count`` of them)."""
    if isinstance(seed_count, bool) or not isinstance(seed_count, int) or seed_count < 1:
        raise ValueError(f"seed_count: expected an int >= 1, got {seed_count!r}")
    return tuple(range(seed, seed + seed_count))


@dataclass
class StudyResults:
    """What ``Study.run`` returns: one JSON-ready dict per training run, study-wide facts (JSON-ready,
    stored beside the rows; e.g. how a peer tool ran) and the wall-clock minutes the runs took."""

    rows: list[dict]
    facts: dict
    minutes: float


@dataclass(frozen=True)
class Study(Generic[C]):
    """One study.  ``run_all(config)`` trains and measures every run, returning (rows, facts);
    ``table`` and ``plot`` render the results as markdown and PNG bytes."""

    name: str  # `slimrate study NAME`
    help: str  # one line for `slimrate study --help`
    title: str  # heading of the table
    stem: str  # output files <stem>.md, <stem>.png, <stem>.json
    config: type[C]  # config() is the full study
    quick: Callable[[], C]  # a seconds-long config, for the tests
    run_all: Callable[[C], tuple[list[dict], dict]]
    table: Callable[[C, StudyResults], str]
    plot: Callable[[C, StudyResults], bytes]
    stem_of: Callable[[C], str] | None = None  # an output name that depends on the config (default: stem)

    def output_stem(self, config: C) -> str:
        """The output files' name for ``config``."""
        return self.stem if self.stem_of is None else self.stem_of(config)

    def run(self, config: C) -> StudyResults:
        """Train and measure every run of ``config``."""
        if not isinstance(config, self.config):
            raise TypeError(f"config: expected a {self.config.__name__} for the {self.name} study, got "
                            f"{type(config).__name__}; build one with STUDIES[{self.name!r}].config() or .quick()")
        started = time.perf_counter()
        rows, facts = self.run_all(config)
        return StudyResults(rows, facts, (time.perf_counter() - started) / 60)

    def write(self, config: C, results: StudyResults, out_dir: str | os.PathLike) -> list[Path]:
        """Write <stem>.md (title, machine line, table), <stem>.png and <stem>.json (config, facts, rows)
        atomically into ``out_dir``, stem = ``output_stem(config)``; returns the three paths."""
        header = (f"# {self.title}\n\n{platform.machine()} {cpu_model()}, {os.cpu_count()} cores, "
                  f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
                  f"{len(results.rows)} runs in {results.minutes:.1f} min, {datetime.date.today()}.\n\n")
        payload = {"config": dataclasses.asdict(config), **results.facts, "rows": results.rows}
        out, stem = Path(out_dir), self.output_stem(config)
        return [write_text_atomic(out / f"{stem}.md", header + self.table(config, results)),
                write_bytes_atomic(out / f"{stem}.png", self.plot(config, results)),
                write_text_atomic(out / f"{stem}.json", json.dumps(payload, indent=1) + "\n")]

"""What every study writes: a markdown table with a provenance line, a PNG plot and a JSON of every run."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from slimrate.files import write_bytes_atomic, write_text_atomic


def write_study_files(out_dir: str | os.PathLike, stem: str, title: str, runs: int, minutes: float,
                      table: str, png: bytes, payload: dict) -> list[Path]:
    """Write <stem>.md (title, machine line, table), <stem>.png and <stem>.json atomically; returns the paths."""
    header = (f"# {title}\n\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {runs} runs in "
              f"{minutes:.1f} min, {datetime.date.today()}.\n\n")
    out = Path(out_dir)
    return [write_text_atomic(out / f"{stem}.md", header + table),
            write_bytes_atomic(out / f"{stem}.png", png),
            write_text_atomic(out / f"{stem}.json", json.dumps(payload, indent=1) + "\n")]

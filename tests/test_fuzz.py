"""A seeded slice of the .slim fuzzer (tools/fuzz_slim.py; `make fuzz` runs the full set): mutated .slim files
and forged coder streams, each run in a worker process with a memory cap and a time limit, must load correctly or
raise a documented error: no crash, hang, memory blow-up, undocumented exception type, undetected corruption or
wrong result."""

import sys
from pathlib import Path

import pytest

from slimrate.ops import extension_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the fuzzer is a dev tool, not a package

if not extension_available():
    pytest.skip("slimrate._C is not built: the .slim coders run in C++", allow_module_level=True)

from fuzz_slim import run_fuzz, summarize  # noqa: E402
from fuzz_slim_cases import FAMILIES, make_case  # noqa: E402
from fuzz_slim_files import seed_files  # noqa: E402
from fuzz_slim_worker import FAILURES  # noqa: E402

CASES_PER_FAMILY = 750  # 3,000 cases: ~20 s on 2 busy cores
SEED = 1  # make fuzz runs seed 0


def test_fuzz_cases_are_reproducible():
    files = seed_files()
    assert seed_files() == files
    for family in FAMILIES:
        first, again = make_case(family, SEED, 3, files), make_case(family, SEED, 3, files)
        assert first == again
        assert make_case(family, SEED + 1, 3, files).data != first.data


def test_fuzz_slice_finds_no_failure():
    results = run_fuzz(SEED, dict.fromkeys(FAMILIES, CASES_PER_FAMILY), workers=2)
    summary = summarize(results, SEED, 1.0, 2, 8 << 20)
    assert summary["cases"] == len(FAMILIES) * CASES_PER_FAMILY
    kinds = [f"{k['count']} × {k['first']['family']} {k['first']['outcome']} {k['first']['exception']}, e.g. "
             f"`python tools/fuzz_slim.py --seed {SEED} --case {k['first']['family']}:{k['first']['index']}`: "
             f"{k['first']['message'].splitlines()[0][:200]}" for k in summary["failure_kinds"]]
    assert not kinds, f"fuzz failures ({', '.join(FAILURES)}) by kind:\n" + "\n".join(kinds)

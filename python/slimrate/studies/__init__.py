"""Studies that compare methods under equal budgets; each writes a table, a plot and a JSON to bench/results/.

Every study follows one protocol (``Study``): a config dataclass whose default is the full study and whose
``seed`` is the base seed of its runs, ``quick()`` for a seconds-long version, ``run`` and ``write``.

    from slimrate.studies import STUDIES, run_study
    run_study("schedules", STUDIES["schedules"].quick(), "out")   # out/schedules_study.{md,png,json}
"""

from __future__ import annotations

import os
from pathlib import Path

from slimrate.studies import backslash, backslash_finetune, dmb, schedules
from slimrate.studies.protocol import Study, StudyResults

STUDIES: dict[str, Study] = {study.name: study for study in (schedules.STUDY, backslash.STUDY, backslash_finetune.STUDY,
                                                                   dmb.STUDY)}


def run_study(name: str, config=None, out_dir: str | os.PathLike = "bench/results") -> list[Path]:
    """Run the study ``name`` with ``config`` (None: its full default) and write its files into ``out_dir``;
    returns their paths (.md, .png, .json)."""
    if name not in STUDIES:
        raise ValueError(f"name: expected one of {list(STUDIES)}, got {name!r}")
    study = STUDIES[name]
    config = study.config() if config is None else config
    return study.write(config, study.run(config), out_dir)


__all__ = ["STUDIES", "Study", "StudyResults", "run_study"]

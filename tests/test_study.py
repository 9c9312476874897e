"""The schedule study end to end in its quick form, and the fairness of its comparison."""

import json

import pytest

from slimrate.cli import main
from slimrate.studies.schedules import quick_config, run_one, schedule_variants


def test_quick_study_writes_table_plot_and_every_run(tmp_path, capsys):
    assert main(["study", "schedules", "--quick", "-o", str(tmp_path)]) == 0
    cfg = quick_config()
    labels = [label for label, _ in schedule_variants(cfg)]
    result = json.loads((tmp_path / "schedules_study.json").read_text())
    rows = result["rows"]
    assert len(rows) == len(cfg.tasks) * len(cfg.budgets) * len(labels) * len(cfg.seeds)
    assert {r["schedule"] for r in rows} == set(labels)
    for r in rows:
        metric = "test_acc" if r["task"] == "digits" else "val_bpc"
        assert r[metric] == r[metric] and r[metric] > 0  # finite, not NaN
    table = (tmp_path / "schedules_study.md").read_text()
    for label in labels:
        assert f"| {label} |" in table
    assert "### digits" in table and "### charlm" in table
    assert (tmp_path / "schedules_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["digits", "charlm"])
def test_uba_phi_2_run_matches_cosine_run(task):
    """φ = 2 is cosine: with the same seed, data and budget the two runs must end the same, which
    also shows that runs differ only by their schedule."""
    cfg = quick_config()
    uba = run_one(cfg, task, {"name": "uba", "phi": 2.0}, 30, seed=1)
    cosine = run_one(cfg, task, {"name": "cosine"}, 30, seed=1)
    wsd = run_one(cfg, task, {"name": "wsd"}, 30, seed=1)
    assert uba == pytest.approx(cosine, rel=1e-6)
    assert wsd != pytest.approx(cosine, rel=1e-6)


def test_study_rejects_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "sizes"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

"""The schedule study end to end in its quick form, and the fairness of its comparison."""

import json
from pathlib import Path

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
    assert main(["study", "sizes"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_quick_backslash_study_writes_sizes_and_pruning(tmp_path):
    assert main(["study", "backslash", "--quick", "-o", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "backslash.json").read_text())["rows"]
    assert {(r["task"], r["lam"]) for r in rows} == {(t, lam) for t in ("digits", "charlm") for lam in (0.0, 50.0)}
    for r in rows:
        # rANS codes within a few % of the empirical entropy; no symbol-wise code beats it by more than
        # its table's share, and exp-Golomb (a fixed code) cannot beat it at all.
        assert r["rans_bits"] <= 1.1 * r["entropy_bits"] + 0.05
        assert r["eg_bits"] >= r["entropy_bits"]
        assert set(r["pruning"]) == {"0.0", "0.8"}
    for task, metric in (("digits", "test_acc"), ("charlm", "val_bpc")):
        plain, constrained = (r for r in rows if r["task"] == task)
        assert constrained["entropy_bits"] < plain["entropy_bits"]  # the rate term lowers the entropy
        assert metric + "_slim" in plain
        assert "nncodec_bits" not in plain  # the quick config never runs nncodec
    table = (tmp_path / "backslash.md").read_text()
    assert "| λ |" in table and "| — | — | — |" in table
    assert "nncodec (DeepCABAC) was not run" in table and "make peers" in table
    assert table.count("Size target") == 2 and table.count("Pruning target") == 2
    assert (tmp_path / "backslash.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nncodec_adapter_codes_each_tensor_at_the_nearest_step():
    """Runs bench/peers/nncodec_sizes.py in the peers venv (`make peers`); skips without it."""
    import torch

    from slimrate.studies.backslash import default_peers_python, nncodec_sizes

    python = default_peers_python()
    if not Path(python).exists():
        pytest.skip(f"no peers venv at {python}: `make peers` creates it")
    weights = {"fc.weight": torch.randn(40, 30) * 0.05, "emb.weight": torch.randn(7, 5) * 0.05}
    result, dq_decoded = nncodec_sizes(python, weights, 0.01)
    assert abs(result["step"] / 0.01 - 1) < 0.004  # qp_density 7: steps 1/128 apart (the script's docstring)
    uniform, dq = result["modes"]["uniform"], result["modes"]["dq"]
    assert set(uniform["bytes"]) == set(weights) and uniform["total_bytes"] == sum(uniform["bytes"].values())
    assert uniform["max_abs_error"] <= result["step"] / 2 * (1 + 1e-6)  # round to nearest, float32 slack
    assert dq["total_bytes"] > 0 and dq["max_abs_error"] > 0
    assert {n: t.shape for n, t in dq_decoded.items()} == {n: w.shape for n, w in weights.items()}

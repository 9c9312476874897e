"""The studies end to end in their quick form through one protocol, and the fairness of the schedule
comparison."""

import dataclasses
import json
from pathlib import Path

import pytest

from slimrate.cli import main
from slimrate.studies import STUDIES, run_study
from slimrate.studies.backslash_finetune import ARMS as FINETUNE_ARMS
from slimrate.studies.backslash_finetune import lam_factor
from slimrate.studies.dmb import ARMS, arms_supported
from slimrate.studies.schedules import SchedulesStudyConfig, quick_config, run_one, schedule_variants

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_schedules(cfg, payload, table):
    labels = [label for label, _ in schedule_variants(cfg)]
    rows = payload["rows"]
    assert len(rows) == len(cfg.tasks) * len(cfg.budgets) * len(labels) * len(cfg.seeds)
    assert {r["schedule"] for r in rows} == set(labels) and {r["seed"] for r in rows} == set(cfg.seeds)
    for r in rows:
        metric = "test_acc" if r["task"] == "digits" else "val_bpc"
        assert r[metric] == r[metric] and r[metric] > 0  # finite, not NaN
    for label in labels:
        assert f"| {label} |" in table
    assert "### digits" in table and "### charlm" in table


def check_backslash(cfg, payload, table):
    rows = payload["rows"]
    assert {(r["task"], r["lam"], r["seed"]) for r in rows} == {
        (t, lam, 1) for t in ("digits", "charlm") for lam in (0.0, 50.0)}
    for r in rows:
        # rANS codes within a few % of the empirical entropy; no symbol-wise code beats it by more than
        # its table's share, and exp-Golomb and the fixed-length code (prefix codes) cannot beat it at all.
        assert r["rans_bits"] <= 1.1 * r["entropy_bits"] + 0.05
        assert r["eg_bits"] >= r["entropy_bits"] and r["fixed_bits"] >= r["entropy_bits"]
        assert set(r["pruning"]) == {"0.0", "0.8"}
    for task, metric in (("digits", "test_acc"), ("charlm", "val_bpc")):
        plain, constrained = (r for r in rows if r["task"] == task)
        assert constrained["entropy_bits"] < plain["entropy_bits"]  # the rate term lowers the entropy
        assert metric + "_slim" in plain
        assert "nncodec_bits" not in plain  # the quick config never runs nncodec
    assert payload["nncodec"] == {}
    assert "| λ |" in table and "| — | — | — |" in table
    assert "nncodec (DeepCABAC) was not run" in table and "make peers" in table
    assert table.count("Size target") == 2 and table.count("Pruning target") == 2
    assert table.count("**Headline**") == 2 and "vs plain + fixed-length" in table and "seeds 1:" in table


def check_backslash_finetune(cfg, payload, table):
    rows = payload["rows"]
    runs = {("plain", 0.0), ("plain finetune", 0.0), ("scratch", 50.0)} | {(arm, 50.0) for arm in FINETUNE_ARMS}
    assert {(r["arm"], r["lam"], r["quant_step"], r["seed"]) for r in rows} == {
        (arm, lam, step, 1) for arm, lam in runs for step in cfg.quant_steps}
    by_run = {(r["arm"], r["quant_step"]): r for r in rows}
    for step in cfg.quant_steps:  # the rate term shrinks the fine-tuned file; its last plain phase lets it regrow
        assert by_run[("constant", step)]["rans_bits"] < by_run[("recipe", step)]["rans_bits"] \
            < by_run[("plain finetune", step)]["rans_bits"]
    assert payload["nncodec"] == {}
    assert "| uba_shape | 50 | 0.005 |" in table and table.count("Size target") == 3
    assert "nncodec was not run" in table


def check_dmb(cfg, payload, table):
    rows = payload["rows"]
    arms = [arm for arm in ARMS if arm.slug in cfg.arms]
    assert [(r["arm"], r["seed"]) for r in rows] == [(arm.label, seed) for arm in arms for seed in (1, 2)]
    assert [arm.label for arm in arms_supported()] == [arm.label for arm in arms]  # quick: every arm that runs here
    for row in rows:
        assert row["bpc"] > 0 and row["se"] > 0 and row["official_bpc"] > 0 and row["official_se"] > 0
        assert [p["step"] for p in row["curve"]] == [3, 6] and row["trained"]
        assert len(row["samples"]) == 1 and len(row["samples"][0]) == 16
        assert Path(row["folder"]).name == f"{row['slug']}-s{row['seed']}"
        assert (row["rates"] is None) == (row["method"] != "dmb")
    frozen = [r for r in rows if r["arm"] == "dmb frozen at init"]
    assert [r["rates"] for r in frozen] == 2 * [{"absorbing_rate": pytest.approx(1.0),
                                                 "other_rate_mean": pytest.approx(1e-10),
                                                 "other_rate_max": pytest.approx(1e-10)}]  # the gather init, untouched
    assert payload["config"]["train"]["steps"] == cfg.train.steps  # the shared training settings are stored
    assert payload["arms_not_run"] == {}
    for arm in arms:
        assert f"| {arm.label} | 2 |" in table
    learning = sum(arm.overrides.get("method") == "dmb" and arm.overrides.get("learn_q", True) for arm in arms)
    assert table.count(" − dmb frozen at init: ") == learning
    assert table.count(" − sedd-absorb: ") == table.count(" − sedd-uniform: ") == learning + 1
    assert "Does the learned Q help?" in table and "![BPC vs steps](dmb.png)" in table


CHECKS = {"schedules": check_schedules, "backslash": check_backslash, "backslash-finetune": check_backslash_finetune,
          "dmb": check_dmb}


@pytest.mark.parametrize("name", list(STUDIES))
def test_quick_study_writes_table_plot_and_json(name, tmp_path, capsys):
    """Every study end to end in its quick form through `slimrate study NAME --quick --seed 1`."""
    study = STUDIES[name]
    assert main(["study", name, "--quick", "--seed", "1", "-o", str(tmp_path)]) == 0
    paths = [tmp_path / f"{study.stem}.{ext}" for ext in ("md", "png", "json")]
    assert capsys.readouterr().out.splitlines() == [f"wrote {path}" for path in paths]
    table = paths[0].read_text()
    assert table.startswith(f"# {study.title}\n\n") and " runs in " in table.splitlines()[2]
    assert paths[1].read_bytes()[:8] == PNG_MAGIC
    payload = json.loads(paths[2].read_text())
    assert payload["config"]["seed"] == 1
    CHECKS[name](dataclasses.replace(study.quick(), seed=1), payload, table)


def test_schedule_seeds_derive_from_the_base_seed():
    assert SchedulesStudyConfig().seeds == (0, 1, 2)  # the default study's seeds (bench/results)
    assert SchedulesStudyConfig(seed=5, seed_count=2).seeds == (5, 6)
    with pytest.raises(ValueError, match="seed_count: expected an int >= 1, got 0"):
        SchedulesStudyConfig(seed_count=0)


def test_run_study_rejects_an_unknown_name(tmp_path):
    names = r"\['schedules', 'backslash', 'backslash-finetune', 'dmb'\]"
    with pytest.raises(ValueError, match=rf"name: expected one of {names}, got 'sizes'"):
        run_study("sizes", None, tmp_path)


def test_study_rejects_another_studys_config():
    with pytest.raises(TypeError, match="config: expected a DMBStudyConfig for the dmb study, got "
                                        "SchedulesStudyConfig"):
        STUDIES["dmb"].run(quick_config())


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


def test_finetune_lam_factors_follow_their_shapes():
    cfg = dataclasses.replace(STUDIES["backslash-finetune"].quick(), finetune_steps=100, warmup_share=0.5,
                              recipe_share=0.6, uba_phi=2.0)
    warmup, uba, recipe = (lam_factor(cfg, arm) for arm in ("linear_warmup", "uba_shape", "recipe"))
    assert [warmup(k) for k in (0, 25, 50, 99)] == [0.0, 0.5, 1.0, 1.0]
    assert [recipe(k) for k in (0, 59, 60, 99)] == [1.0, 1.0, 0.0, 0.0]
    assert [uba(k) for k in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])  # φ = 2: cosine
    assert lam_factor(cfg, "constant")(77) == 1.0

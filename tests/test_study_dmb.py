"""The DMB seed study's machinery: run folders kept and reused only when their settings match, arms this
DMBConfig cannot express recorded instead of failing, runs trained in parallel, the paired verdicts, and the
command line's arms, seeds, model, run folders and jobs."""

import dataclasses
import json
from pathlib import Path

import pytest

from slimrate.cli import main
from slimrate.dmb import DMBConfig, train_dmb
from slimrate.dmb.driver import FORMAT, MODEL_FILE, RUN_FILE, VERSION
from slimrate.studies import STUDIES
from slimrate.studies import dmb as study
from slimrate.studies.dmb_report import paired
from slimrate.train.checkpoint import write_manifest


def tiny_study(tmp_path, **overrides):
    cfg = dataclasses.replace(study.quick_config(), arms=("sedd-absorb", "dmb-frozen-init"), seeds=(0,),
                              runs_dir=str(tmp_path / "runs"), official_repeats=2)
    return dataclasses.replace(cfg, **overrides)


def weights_mtimes(rows):
    return {r["folder"]: (Path(r["folder"]) / MODEL_FILE).stat().st_mtime_ns for r in rows}


def test_finished_runs_are_reused_and_changed_settings_retrain(tmp_path):
    cfg = tiny_study(tmp_path)
    # the frozen run trained beforehand by a plain script, with a progress bar (a setting that changes nothing)
    plain = dataclasses.replace(cfg.train, out_dir=str(tmp_path / "runs" / "dmb-frozen-init-s0"), seed=0,
                                method="dmb", learn_q=False, progress=True)
    train_dmb(plain)
    first, facts = study.run_all(cfg)
    assert [(r["slug"], r["trained"]) for r in first] == [("sedd-absorb", True), ("dmb-frozen-init", False)]
    assert facts == {"arms_not_run": {}, "jobs": 1, "runs_not_run": []}
    before = weights_mtimes(first)
    second, _ = study.run_all(cfg)
    assert not any(r["trained"] for r in second) and weights_mtimes(second) == before
    assert [r["bpc"] for r in second] == [r["bpc"] for r in first]  # the same models, the same evaluation times
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4, eval_every=2))
    third, _ = study.run_all(longer)
    assert all(r["trained"] for r in third) and all(r["curve"][-1]["step"] == 4 for r in third)
    assert all(a != b for a, b in zip(weights_mtimes(third).values(), before.values(), strict=True))


def test_a_saved_run_without_a_newer_field_counts_at_its_default(tmp_path):
    """A run folder written before a DMBConfig field existed is reused when the field's default is wanted."""
    cfg = tiny_study(tmp_path, arms=("sedd-absorb",))
    rows, _ = study.run_all(cfg)
    folder = Path(rows[0]["folder"])
    record = json.loads((folder / RUN_FILE).read_text())
    del record["config"]["learn_q"], record["config"]["parallel"]
    (folder / RUN_FILE).write_text(json.dumps(record))
    write_manifest(folder, FORMAT, VERSION, (MODEL_FILE, RUN_FILE))
    assert not study.run_all(cfg)[0][0]["trained"]
    (folder / RUN_FILE).write_text(json.dumps(record) + " ")  # no longer what the manifest covers
    assert study.run_all(cfg)[0][0]["trained"]


def test_arms_this_dmbconfig_cannot_express_are_recorded_not_run(tmp_path, monkeypatch):
    cfg = tiny_study(tmp_path)
    arms = (study.Arm("sedd-uniform", "sedd-uniform", {"method": "sedd-uniform"}),
            study.Arm("dmb warp", "dmb-warp", {"method": "dmb", "warp_factor": 9}),
            study.Arm("uniform frozen", "uniform-frozen", {"method": "sedd-uniform", "learn_q": False}))
    monkeypatch.setattr(study, "ARMS", arms)
    monkeypatch.setattr(study, "ARM_SLUGS", tuple(arm.slug for arm in arms))
    rows, facts = study.run_all(dataclasses.replace(cfg, arms=study.ARM_SLUGS))
    assert [r["arm"] for r in rows] == ["sedd-uniform"]
    assert set(facts["arms_not_run"]) == {"dmb warp", "uniform frozen"}
    assert "warp_factor" in facts["arms_not_run"]["dmb warp"]
    assert "learn_q: only DMB learns Q" in facts["arms_not_run"]["uniform frozen"]
    assert [arm.slug for arm in study.arms_supported()] == ["sedd-uniform", "uniform-frozen"]


def test_two_jobs_train_both_runs_in_worker_processes(tmp_path):
    cfg = tiny_study(tmp_path, seeds=(0, 1), arms=("sedd-absorb",), jobs=2)
    configs = [study.arm_config(cfg, study.ARMS[0], seed, Path(cfg.runs_dir)) for seed in (0, 1)]
    assert study.train_missing(configs, jobs=2) == configs
    assert all(study.finished(c) for c in configs)
    assert study.train_missing(configs, jobs=2) == []


def test_without_training_only_finished_runs_are_reported_and_the_rest_listed(tmp_path):
    cfg = tiny_study(tmp_path, seeds=(0, 1))
    done = dataclasses.replace(cfg.train, out_dir=str(tmp_path / "runs" / "dmb-frozen-init-s1"), seed=1,
                               method="dmb", learn_q=False)
    train_dmb(done)
    rows, facts = study.run_all(dataclasses.replace(cfg, train_missing=False))
    assert [(r["slug"], r["seed"], r["trained"]) for r in rows] == [("dmb-frozen-init", 1, False)]
    assert facts["runs_not_run"] == ["sedd-absorb, seed 0", "sedd-absorb, seed 1", "dmb frozen at init, seed 0"]
    assert not (tmp_path / "runs" / "sedd-absorb-s0").exists()


def test_paired_verdict_uses_the_seeds_both_arms_have():
    a = [{"arm": "a", "seed": s, "bpc": 3.0 + s, "se": 0.01} for s in (0, 1, 2)]
    b = [{"arm": "b", "seed": 1, "bpc": 3.5, "se": 0.01}]
    assert "+0.500 bits/char over 1 seed (s1 +0.500;" in paired(a, b)
    assert paired(a, [{"arm": "c", "seed": 5, "bpc": 3.0, "se": 0.01}]) == "a − c: no seed in common."


def test_paired_verdict_needs_one_sign_and_twice_the_monte_carlo_error():
    def rows(arm, bpcs, se):
        return [{"arm": arm, "seed": s, "bpc": b, "se": se} for s, b in enumerate(bpcs)]

    base = rows("b", [3.0, 3.1, 3.2], 0.01)
    assert paired(rows("a", [2.9, 3.0, 3.1], 0.01), base).endswith("lower (better).")
    assert paired(rows("a", [3.1, 3.2, 3.3], 0.01), base).endswith("higher (worse).")
    assert paired(rows("a", [2.9, 3.2, 3.1], 0.01), base).endswith("no significant difference.")  # signs differ
    # same sign, but |mean| = 0.1 < 2 × √(3 · 2 · 0.1²) / 3 = 0.163
    assert paired(rows("a", [2.9, 3.0, 3.1], 0.1), base).endswith("no significant difference.")
    assert "-0.100 bits/char over 3 seeds (s0 -0.100, s1 -0.100, s2 -0.100; Monte Carlo error 0.008)" in paired(
        rows("a", [2.9, 3.0, 3.1], 0.01), base)


def test_model_option_names_the_outputs_and_the_run_folders(tmp_path):
    from slimrate.cli.study import dmb_config

    args = type("Args", (), {"model": "medium", "arms": ("dmb-interleaved-prior", "dmb-frozen-init"),
                             "seeds": (0,), "jobs": 2, "runs_dir": None, "out": str(tmp_path), "device": None,
                             "train_missing": False, "steps": None})()
    cfg = dmb_config(study.DMBStudyConfig(), args)
    assert cfg.train.model == "medium" and cfg.train.steps == 10000 and cfg.seeds == (0,) and cfg.jobs == 2
    assert not cfg.train_missing
    assert STUDIES["dmb"].output_stem(cfg) == "dmb_medium" and cfg.runs_dir == str(tmp_path / "dmb_medium-runs")
    assert STUDIES["dmb"].output_stem(study.DMBStudyConfig()) == "dmb"
    args.steps = 3000
    cfg = dmb_config(study.DMBStudyConfig(), args)
    assert cfg.train.steps == 3000 and cfg.train.eval_every == 500
    assert STUDIES["dmb"].output_stem(cfg) == "dmb_medium_3000steps"
    args.model = None
    assert STUDIES["dmb"].output_stem(dmb_config(study.DMBStudyConfig(), args)) == "dmb_3000steps"


def test_study_training_is_what_earlier_runs_were_trained_with(tmp_path):
    """Runs trained before the study kept its folders used these settings and
    train_dmb(replace(study_training(), out_dir=…, seed=…, **overrides)); changing them would retrain them."""
    cfg = study.DMBStudyConfig()
    for arm in study.arms_supported():
        expected = dataclasses.replace(study.study_training(), out_dir=str(tmp_path / f"{arm.slug}-s2"), seed=2,
                                       **arm.overrides)
        if arm.overrides.get("phases") == "official":  # the study's lanes named the official p̂_0 sampling
            expected = dataclasses.replace(expected, p0_samples=512, p0_steps=128)
        assert study.same_settings(study.arm_config(cfg, arm, 2, tmp_path), expected)
    assert dataclasses.asdict(study.study_training()) == dataclasses.asdict(DMBConfig(
        out_dir="", steps=10000, eval_every=500, checkpoint_every=0, log_every=500, progress=False))
    assert [(arm.label, arm.slug) for arm in study.ARMS if arm.slug in (
        "sedd-absorb", "sedd-uniform", "dmb-interleaved-prior", "dmb-frozen-init")] == [
        ("sedd-absorb", "sedd-absorb"), ("sedd-uniform", "sedd-uniform"), ("dmb interleaved", "dmb-interleaved-prior"),
        ("dmb frozen at init", "dmb-frozen-init")]


@pytest.mark.parametrize("overrides, message", [
    ({"arms": ("sedd-absorb", "sedd")}, "arms: expected slugs among sedd-absorb, .*got \\['sedd-absorb', 'sedd'\\]"),
    ({"arms": ()}, "arms: expected slugs among"),
    ({"seeds": (0, 0)}, "seeds: expected distinct seeds, at least one, got \\[0, 0\\]"),
    ({"seeds": ()}, "seeds: expected distinct seeds, at least one, got \\[\\]"),
    ({"jobs": 0}, "jobs: expected an int >= 1, got 0"),
])
def test_study_config_rejects_bad_arms_seeds_and_jobs(overrides, message):
    with pytest.raises(ValueError, match=message):
        study.DMBStudyConfig(**overrides)


@pytest.mark.parametrize("argv, message", [
    (["--arms", "sedd-absorb,nope"], "--arms: unknown nope; expected slugs among sedd-absorb"),
    (["--seeds", "0,0"], "--seeds: expected distinct seeds, got 0,0"),
    (["--seeds", "0,x"], "--seeds: expected comma-separated integers like 0,1,2, got '0,x'"),
    (["--jobs", "0"], "--jobs: expected an integer > 0, got 0"),
    (["--model", "huge"], "--model: invalid choice: 'huge'"),
    (["--steps", "0"], "--steps: expected an integer > 0, got 0"),
])
def test_cli_rejects_bad_study_options(tmp_path, capsys, argv, message):
    assert main(["study", "dmb", "--quick", "-o", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err

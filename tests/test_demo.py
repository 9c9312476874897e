"""The main job end to end at a small budget, its CLI, and the size metrics it reports."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from slimrate.backslash.metrics import quantized_entropy_bits, small_weight_share
from slimrate.cli import main
from slimrate.data.digits import load_digits_split


def test_demo_runs_end_to_end_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--steps", "60", "--lam", "50", "--seed", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plain" in printed and "BackSlash λ=50" in printed and ".slim bits/w" in printed
    result = json.loads(out.read_text())
    assert result["config"]["steps"] == 60 and result["config"]["seed"] == 3
    plain, backslash = result["rows"]
    for row in (plain, backslash):
        assert 0.0 <= row["test_acc"] <= 1.0 and 0.1 <= row["nu"] <= 3.0
        assert row["bits_per_param"] > 0 and math.isfinite(row["rate"])
        # a prefix code of the symbols cannot beat their empirical entropy (Kraft's inequality)
        assert row["slim_bits_per_param"] >= row["bits_per_param"]
    # Even 60 steps of the decoupled shrink move more weights towards zero than plain training.
    assert backslash["near_zero"] > plain["near_zero"]


def test_demo_is_reproducible_for_a_seed(tmp_path):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p in paths:
        main(["demo", "--steps", "20", "--json", str(p)])
    rows = [json.loads(p.read_text())["rows"] for p in paths]
    assert rows[0] == rows[1]


def test_demo_mode_loss_and_its_older_name_grad_train_alike(tmp_path):
    paths = {mode: tmp_path / f"{mode}.json" for mode in ("loss", "grad", "decoupled")}
    for mode, path in paths.items():
        assert main(["demo", "--steps", "20", "--lam", "10", "--mode", mode, "--json", str(path)]) == 0
    rows = {mode: json.loads(path.read_text())["rows"] for mode, path in paths.items()}
    assert rows["loss"] == rows["grad"] and rows["loss"][1] != rows["decoupled"][1]


@pytest.mark.parametrize("argv,message", [
    (["demo", "--steps", "0"], "expected an integer > 0"),
    (["demo", "--lam", "-1"], "expected a number >= 0"),
    (["demo", "--mode", "sideways"], "invalid choice"),
])
def test_demo_rejects_bad_flags(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_quantized_entropy_matches_scipy():
    tensors = [torch.randn(300, 7) * 0.05, torch.randn(41) * 0.2]
    step = 0.01
    symbols = np.concatenate([np.round(t.double().numpy().ravel() / step) for t in tensors])
    _, counts = np.unique(symbols, return_counts=True)
    assert quantized_entropy_bits(tensors, step) == pytest.approx(entropy(counts, base=2), rel=1e-12)


def test_quantized_entropy_rejects_bad_step():
    with pytest.raises(ValueError, match="step: expected a quantization step > 0"):
        quantized_entropy_bits([torch.randn(4)], 0.0)


def test_small_weight_share_counts_pooled_elements():
    a, b = torch.randn(100) * 1e-2, torch.randn(50)
    expected = (np.abs(np.concatenate([a.numpy(), b.numpy()])) < 1e-3).mean()
    assert small_weight_share([a, b], 1e-3) == pytest.approx(expected)


def test_digits_split_is_fixed_and_disjoint():
    x_train, y_train, x_test, y_test = load_digits_split()
    again = load_digits_split()
    assert torch.equal(x_test, again[2]) and torch.equal(y_train, again[1])
    assert x_train.shape == (1348, 64) and x_test.shape == (449, 64)
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert set(y_test.tolist()) == set(range(10))
    train_rows = {tuple(r) for r in x_train.tolist()}
    # load_digits has a few duplicate images; the split itself must not put one sample in both halves
    assert sum(tuple(r) in train_rows for r in x_test.tolist()) < 10


def test_demo_out_writes_metrics_of_both_runs(tmp_path):
    assert main(["demo", "--steps", "30", "--out", str(tmp_path)]) == 0
    for run in ("plain", "backslash"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert lines and all('"step"' in line for line in lines)
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / run).rglob("*"))


def test_demo_wandb_needs_out(capsys):
    assert main(["demo", "--wandb"]) == 2
    assert "--wandb: needs --out" in capsys.readouterr().err

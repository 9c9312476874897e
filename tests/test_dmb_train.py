"""DMB end to end: training through the shared loop and its resume, the CLI (train, eval, sample), the
data loaders (text files, digits, CIFAR-10 pickles) and the model folder's manifest check."""

import contextlib
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimrate.cli import main
from slimrate.dmb import DMBConfig, TokenData, load_model, load_token_data, read_cifar10_batch, train_dmb
from slimrate.train import CheckpointError, list_checkpoints
from slimrate.train.checkpoint import write_manifest

from helpers import finish_process, kill_after_checkpoint, start_process

SLOW_CLI = Path(__file__).with_name("slow_cli.py")

TINY = {"model": "tiny", "seq_len": 16, "batch": 8, "eval_sequences": 4, "eval_samples": 2, "p0_samples": 4,
        "p0_steps": 3, "matrix_steps": 2, "log_every": 1, "progress": False}


class Crash(Exception):
    pass


@contextlib.contextmanager
def crash_score_batches_at(step: int, seed: int = 0):
    """Within the block, the batch stream of seed ``seed`` (score learning's; matrix batches of the bound
    objective draw from their own seed) raises Crash when asked for ``step``."""
    batch_fn = TokenData.batch_fn

    def crashing_batch_fn(self, batch, stream_seed, device="cpu"):
        get_batch = batch_fn(self, batch, stream_seed, device)

        def get(at, rank, world_size):
            if at == step and stream_seed == seed:
                raise Crash
            return get_batch(at, rank, world_size)
        return get

    TokenData.batch_fn = crashing_batch_fn
    try:
        yield
    finally:
        TokenData.batch_fn = batch_fn


@pytest.mark.parametrize("method", ["dmb", "sedd-absorb"])
def test_train_resumes_bit_identically_after_a_crash(tmp_path, monkeypatch, method):
    """6 steps, DMB's outer loop every 2, a checkpoint every 3.  A run that crashes at step 4 and is resumed
    must end with the same weights, rates, p̂_0 and bound as the uninterrupted run."""
    torch.set_num_threads(1)  # bit-identical resume needs a fixed thread count (slimrate.train.loop)
    config = dict(method=method, steps=6, outer_every=2, checkpoint_every=3, **TINY)
    train_dmb(DMBConfig(out_dir=str(tmp_path / "full"), **config))
    expected, manifest = load_model(tmp_path / "full")[0].state_dict(), json.loads(
        (tmp_path / "full" / "dmb.json").read_text())

    with crash_score_batches_at(4), pytest.raises(Crash):
        train_dmb(DMBConfig(out_dir=str(tmp_path / "part"), **config))
    assert [step for step, _ in list_checkpoints(tmp_path / "part" / "checkpoints")] == [3]
    with pytest.raises(ValueError, match="resume=True"):
        train_dmb(DMBConfig(out_dir=str(tmp_path / "part"), **config))
    resumed = train_dmb(DMBConfig(out_dir=str(tmp_path / "part"), resume=True, **config))
    got = load_model(tmp_path / "part")[0].state_dict()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert resumed["final_eval"] == manifest["final_eval"]


def test_cli_run_killed_with_sigkill_and_resumed_ends_bit_identical(tmp_path):
    """`slimrate dmb train` in a subprocess, killed after its step-10 checkpoint of 30 and resumed with --resume,
    ends with the weights and the bound of an uninterrupted run (here in-process, while the victim runs)."""
    torch.set_num_threads(1)  # as the subprocesses (start_process): bit-identical needs the same thread count
    train = [sys.executable, str(SLOW_CLI), "0.1", "dmb", "train", "--data", "text8", "--seq-len", "16", "--model",
             "tiny", "--batch", "4", "--budget", "30", "--checkpoint-every", "5", "--no-progress", "--out",
             str(tmp_path / "run")]
    victim = start_process(train)
    whole = train_dmb(DMBConfig(out_dir=str(tmp_path / "whole"), data="text8", seq_len=16, model="tiny", batch=4,
                                steps=30, checkpoint_every=5, progress=False))
    kill_after_checkpoint(victim, tmp_path / "run" / "checkpoints", 10, 30)
    finish_process(start_process(train[:2] + ["0"] + train[3:] + ["--resume"]), "resumed run")
    expected, (got, _, record) = load_model(tmp_path / "whole")[0].state_dict(), load_model(tmp_path / "run")
    for name, tensor in expected.items():
        assert torch.equal(tensor, got.state_dict()[name]), name
    assert record["final_eval"] == whole["final_eval"]


def test_cli_keeps_the_checkpoints_it_is_asked_to(tmp_path):
    out = tmp_path / "run"
    assert main(["dmb", "train", "--data", "digits", "--budget", "5", "--out", str(out), "--model", "tiny",
                 "--batch", "4", "--method", "sedd-uniform", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                 "--no-progress"]) == 0
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2, 4, 5]


@pytest.mark.parametrize("setting, message", [
    (dict(checkpoint_every=-1), "checkpoint_every: expected an int >= 0, got -1"),
    (dict(keep_checkpoints=0), "keep_checkpoints: expected an int >= 1, got 0"),
    (dict(keep_checkpoints=True), "keep_checkpoints: expected an int >= 1, got True"),
])
def test_config_rejects_bad_checkpoint_settings(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        DMBConfig(out_dir=str(tmp_path), **setting)


def test_config_rejects_an_unknown_parallel_mode(tmp_path):
    with pytest.raises(ValueError, match="parallel: expected one of ddp, fsdp, got 'zero'"):
        DMBConfig(out_dir=str(tmp_path), parallel="zero")


def test_config_rejects_a_frozen_q_for_the_baselines(tmp_path):
    with pytest.raises(ValueError, match="only DMB learns Q"):
        DMBConfig(out_dir=str(tmp_path), method="sedd-uniform", learn_q=False)


def test_fixed_q_run_keeps_the_init_rates_and_the_training_histogram(tmp_path):
    """learn_q=False: no matrix learning and no p̂_0 re-estimation, so Q and p̂_0 end where they started
    (with learn_q=True, the same run moves both)."""
    fixed = train_dmb(DMBConfig(out_dir=str(tmp_path / "fixed"), steps=4, outer_every=2, learn_q=False, **TINY))
    model = load_model(tmp_path / "fixed")[0]
    init = torch.zeros(16, 26, dtype=torch.float64) + 1e-10  # L = 16, V − 1 = 26
    init[:, -1] += 1.0
    assert torch.equal(model.rates.rates(), init)
    assert torch.equal(model.p0_hat, load_token_data("text8", 16).histogram())
    assert "matrix_kl" not in (tmp_path / "fixed" / "metrics.jsonl").read_text()
    assert fixed["config"]["learn_q"] is False
    train_dmb(DMBConfig(out_dir=str(tmp_path / "learned"), steps=4, outer_every=2, **TINY))
    learned = load_model(tmp_path / "learned")[0]
    assert not torch.equal(learned.rates.rates(), init) and not torch.equal(learned.p0_hat, model.p0_hat)


def test_cli_trains_evaluates_and_samples_text(tmp_path, capsys):
    corpus = tmp_path / "text8"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40)
    out = tmp_path / "run"
    assert main(["dmb", "train", "--data", str(corpus), "--budget", "3", "--out", str(out), "--model", "tiny",
                 "--seq-len", "16", "--batch", "4", "--method", "sedd-uniform", "--no-progress"]) == 0
    assert "bits/token after 3 steps" in capsys.readouterr().out
    assert (out / "metrics.jsonl").is_file() and (out / "model.safetensors").is_file()
    assert main(["dmb", "eval", str(out), "--sequences", "4", "--samples", "2"]) == 0
    line = capsys.readouterr().out
    assert "bound, protocol ours:" in line and "±" in line and "4 sequences × 2 times" in line
    assert "bits per character" in line
    assert main(["dmb", "eval", str(out), "--sequences", "4", "--protocol", "official", "--repeats", "3"]) == 0
    line = capsys.readouterr().out
    assert "bound, protocol official:" in line and "SE over 3 repeats of one uniform t per sequence" in line
    assert main(["dmb", "sample", str(out), "-n", "3", "--steps", "4"]) == 0
    samples = capsys.readouterr().out.splitlines()
    assert len(samples) == 3 and all(len(s) == 16 and set(s) <= set(" abcdefghijklmnopqrstuvwxyz") for s in samples)


def test_cli_samples_digits_as_a_png_grid(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["dmb", "train", "--data", "digits", "--budget", "2", "--out", str(out), "--model", "tiny",
                 "--batch", "4", "--method", "sedd-absorb", "--no-progress"]) == 0
    assert main(["dmb", "sample", str(out), "-n", "4", "--steps", "3", "--sampler", "analytic"]) == 0
    assert "samples.png" in capsys.readouterr().out
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["dmb", "train", "--data", "/nonexistent/text8", "--budget", "2", "--out", "x"], "no such file or folder"),
    (["dmb", "eval", "/nonexistent/run"], "no dmb.json here"),
    (["dmb", "sample", "/nonexistent/run"], "no dmb.json here"),
    (["dmb", "train", "--data", "digits", "--budget", "0", "--out", "x"], "expected an integer > 0"),
    (["dmb", "train", "--data", "digits", "--budget", "2", "--out", "x", "--method", "d3pm"], "invalid choice"),
    (["dmb", "train", "--budget", "2", "--out", "x", "--method", "sedd-absorb", "--no-learn-q"],
     "only --method dmb learns Q"),
    (["dmb", "train", "--budget", "2", "--out", "x", "--checkpoint-every", "0"],
     "--checkpoint-every: expected an integer > 0, got 0"),
    (["dmb", "train", "--budget", "2", "--out", "x", "--keep-checkpoints", "0"],
     "--keep-checkpoints: expected an integer > 0, got 0"),
])
def test_cli_rejects_bad_inputs(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--samples", "0", "expected an even number >= 2 (two times in each stratum of t), got 0"),
    ("--samples", "1", "expected an even number >= 2 (two times in each stratum of t), got 1"),
    ("--samples", "7", "expected an even number >= 2 (two times in each stratum of t), got 7"),
    ("--repeats", "0", "expected >= 2 (the standard error needs two), got 0"),
    ("--repeats", "1", "expected >= 2 (the standard error needs two), got 1")])
def test_cli_rejects_too_few_or_odd_samples_and_too_few_repeats(tmp_path, capsys, flag, value, message):
    (tmp_path / "dmb.json").write_text("{}")
    assert main(["dmb", "eval", str(tmp_path), flag, value]) == 2
    assert f"{flag}: {message}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A finished one-step run; tests tamper with copies of it."""
    folder = tmp_path_factory.mktemp("dmb-run")
    train_dmb(DMBConfig(out_dir=str(folder), method="sedd-uniform", steps=1, **TINY))
    return folder


def flip_a_weight_byte(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[int(torch.randint(len(data) // 2, len(data), ()))] ^= 0x01  # in the tensor bytes, past the header
    weights.write_bytes(bytes(data))


def edit_a_setting(folder):
    record = json.loads((folder / "dmb.json").read_text())
    record["config"]["steps"] += 1
    (folder / "dmb.json").write_text(json.dumps(record))


def edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def set_manifest_version(folder, version):
    edit_manifest(folder, lambda m: m.update(version=version))


def forge(folder, name, data):
    """Replace the file ``name`` and recompute the manifest, as someone forging a run folder would."""
    (folder / name).write_bytes(data)
    write_manifest(folder, "slimrate-dmb", 2, ("model.safetensors", "dmb.json"))


@pytest.mark.parametrize("tamper, message", [
    (flip_a_weight_byte, r"model\.safetensors: SHA-256 [0-9a-f]+ does not match the manifest's"),
    (edit_a_setting, r"dmb\.json: SHA-256 [0-9a-f]+ does not match the manifest's"),
    (lambda folder: (folder / "manifest.json").unlink(), r"no manifest\.json, so its files cannot be verified"),
    (lambda folder: (folder / "dmb.json").unlink(), r"dmb\.json: missing"),
    (lambda folder: set_manifest_version(folder, 1), r"expected format 'slimrate-dmb' version 2, got 'slimrate-dmb' "
                                                     r"version 1"),
    (lambda folder: (folder / "manifest.json").write_bytes(b""), r"manifest\.json: empty \(0 bytes\)"),
    (lambda folder: (folder / "manifest.json").write_text("[]"), r"manifest\.json: expected a JSON object, got list"),
    (lambda folder: edit_manifest(folder, lambda m: m["sha256"].pop("dmb.json")), r"lists no SHA-256 for dmb\.json"),
    (lambda folder: edit_manifest(folder, lambda m: m["sha256"].update({"metrics.jsonl": "0" * 64})),
     r"lists 'metrics\.jsonl', which is not a file of a 'slimrate-dmb' folder"),
    (lambda folder: forge(folder, "dmb.json", b"{\"config\": "), r"dmb\.json: not valid JSON"),
    (lambda folder: forge(folder, "dmb.json", b"[1, 2]"), r"dmb\.json: does not describe the model in "
                                                         r"model\.safetensors \(TypeError"),
    (lambda folder: forge(folder, "dmb.json", json.dumps(
        {k: v for k, v in json.loads((folder / "dmb.json").read_text()).items() if k != "noise"}).encode()),
     r"dmb\.json: does not describe the model in model\.safetensors \(KeyError: 'noise'\)"),
    (lambda folder: forge(folder, "model.safetensors", b"\x10" + bytes(7) + b"{}"),
     r"model\.safetensors: not a valid safetensors file"),
], ids=["weights", "settings", "no-manifest", "no-settings", "old-version", "empty-manifest", "manifest-list",
        "unlisted-settings", "listed-extra", "settings-not-json", "settings-list", "settings-no-noise",
        "weights-not-safetensors"])
def test_load_model_refuses_a_tampered_folder(trained_folder, tmp_path, tamper, message):
    folder = tmp_path / "run"
    shutil.copytree(trained_folder, folder)
    load_model(folder)  # the copy as written loads
    tamper(folder)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(folder)
    assert "train it again" in str(error.value)


def write_cifar_batch(path, n, seed):
    """A file in the CIFAR-10 python format: a pickled dict with b'data' (n, 3072) uint8 and b'labels'."""
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"test", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch[b"data"]


def test_cifar10_batches_load_as_pixel_tokens(tmp_path):
    train = write_cifar_batch(tmp_path / "data_batch_1", 5, 0)
    test = write_cifar_batch(tmp_path / "test_batch", 3, 1)
    data = load_token_data(str(tmp_path))
    assert (data.vocab_size, data.seq_len, data.image_shape) == (256, 3072, (3, 32, 32))
    assert torch.equal(data.train, torch.from_numpy(train)) and torch.equal(data.eval, torch.from_numpy(test).long())
    assert data.histogram().shape == (3072, 256)


def test_cifar10_reader_refuses_pickles_that_load_other_globals(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (__builtin__|builtins)\.print"):
        read_cifar10_batch(path)


def test_data_loaders_report_missing_paths_and_short_texts(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'text8', 'digits'"):
        load_token_data(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        load_token_data(str(tmp_path))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="too short for seq_len=64"):
        load_token_data(str(short), 64)

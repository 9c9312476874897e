"""The training loop under FSDP2 (parallel="fsdp"): two CPU processes under torchrun against one process with the
same global batch, sharded checkpoints (layout, manifest, kill-and-resume, damaged shards) and re-sharding at
resume (a two-process checkpoint resumed in one process); the argument checks in-process on a one-rank group."""

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import train_script
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from slimrate.train import (
    CheckpointError,
    TrainConfig,
    is_sharded,
    list_checkpoints,
    load_checkpoint,
    read_jsonl,
    shard_model,
    train,
    verify_sharded_checkpoint,
)
from slimrate.train.checkpoint import MANIFEST_FILE, read_state_files

from helpers import assert_states_equal, finish_process, free_port, kill_after_checkpoint, start_process, start_torchrun

SCRIPT = Path(__file__).with_name("train_script.py")
STEPS, EVERY = 40, 10
# SGD without dropout, so that one process with the whole batch computes what two do with half each; BackSlash's
# RateConstraint (on the sharded parameters) and an EMA of the weights (its state sharded with the model) as hooks.
RUN_ARGS = ["--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--optimizer", "sgd", "--dropout", "0",
            "--parallel", "fsdp", "--hook", "both"]
SHARD_FILES = {".metadata", "__0_0.distcp", "__1_0.distcp", "tensors.safetensors", "state.json", MANIFEST_FILE}



def _torchrun(out, *extra):
    return start_torchrun([str(SCRIPT), *RUN_ARGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three FSDP runs on two processes (uninterrupted; killed after its step-20 checkpoint, then resumed) and
    one single-process run; returns the folder holding fsdp/, cut/ and single/."""
    root = tmp_path_factory.mktemp("fsdp")
    whole = _torchrun(root / "fsdp")
    victim = _torchrun(root / "cut", "--step-delay", "0.05")
    single = start_process([sys.executable, str(SCRIPT), *RUN_ARGS, "--out", str(root / "single")])
    kill_after_checkpoint(victim, root / "cut" / "checkpoints", 2 * EVERY, STEPS)
    resumed = _torchrun(root / "cut", "--resume")
    for proc, what in ((whole, "uninterrupted FSDP run"), (single, "single process"), (resumed, "resumed FSDP run")):
        finish_process(proc, what)
    return root


@pytest.fixture
def deterministic():
    """train_script.main in this process: one thread, deterministic algorithms; restored afterwards."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(strict)


def _final(folder):
    return load_file(str(folder / "final-rank0.safetensors"))


def _sharded_state(folder, tmp_path):
    """The DCP part of a sharded checkpoint, whole tensors in one process (model, optimizer, hooks)."""
    out = tmp_path / f"{folder.parent.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


# ---- two processes ----

def test_fsdp_two_processes_match_one_process_with_the_same_global_batch(runs):
    rank0, rank1 = (load_file(str(runs / "fsdp" / f"final-rank{r}.safetensors")) for r in (0, 1))
    assert_states_equal(rank0, rank1)  # both gathered the same whole weights
    one = _final(runs / "single")
    # Two 16-sample means averaged by reduce-scatter vs one 32-sample mean, and the clipping norm summed over
    # shards: the same up to fp32 rounding. After 40 SGD steps weights of size <= 0.4 differed by 1.1e-7
    # (measured), so atol 1e-6 leaves a 9x margin, while training on one 16-sample shard alone moves them by ~0.1.
    for name in one:
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    fsdp, single = (read_jsonl(runs / name / "metrics.jsonl") for name in ("fsdp", "single"))
    # clip_grad_norm_ on DTensor gradients gives the unsharded norm; R and ν are reduced over the shards
    for key in ("loss", "grad_norm", "backslash_rate", "backslash_nu"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in single], rel=1e-5), key


def test_sharded_checkpoint_holds_each_ranks_part_our_state_and_the_manifest(runs, tmp_path):
    folder = runs / "fsdp" / "checkpoints" / f"step-{STEPS:08d}"
    assert [s for s, _ in list_checkpoints(folder.parent)] == [STEPS - EVERY, STEPS]  # keep 2, temp folders gone
    assert {p.name for p in folder.iterdir()} == SHARD_FILES
    manifest = verify_sharded_checkpoint(folder)
    assert (manifest["format"], manifest["version"], manifest["step"], manifest["world_size"]) == (
        "slimrate-sharded-checkpoint", 1, STEPS, 2)
    assert set(manifest["sha256"]) == SHARD_FILES - {MANIFEST_FILE}
    rest = read_state_files(folder)
    assert set(rest) == {"step", "world_size", "config", "rng", "scheduler", "hooks"}
    assert (rest["step"], rest["world_size"], len(rest["rng"]), rest["hooks"]) == (STEPS, 2, 2, 2)
    state = _sharded_state(folder, tmp_path)
    assert_states_equal(state["model"], _final(runs / "fsdp"))  # DCP keys "model.<fqn>": the whole weights
    assert state["hooks"][0]["steps"] == STEPS and state["hooks"][1]["updates"] == STEPS
    assert set(state["optimizer"]) == {"state", "param_groups"}


def test_fsdp_run_killed_mid_way_and_resumed_ends_bit_identical(runs, tmp_path):
    assert_states_equal(_final(runs / "cut"), _final(runs / "fsdp"))
    last = [runs / name / "checkpoints" / f"step-{STEPS:08d}" for name in ("cut", "fsdp")]
    assert_states_equal(*(_sharded_state(folder, tmp_path) for folder in last))  # model, optimizer, EMA
    a, b = (read_state_files(folder) for folder in last)
    for key in ("step", "scheduler", "rng", "hooks"):
        assert_states_equal(a[key], b[key], key)
    assert [r["step"] for r in read_jsonl(runs / "cut" / "metrics.jsonl")] == list(range(EVERY, STEPS + 1, EVERY))


# ---- resuming in this process: re-sharding, damaged shards ----

def _copy_run(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "fsdp" / "checkpoints", out / "checkpoints")
    return out


def _resume_here(out, steps):
    """train_script's run resumed in this process (one rank, the model not sharded); returns the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_script.main([*RUN_ARGS, "--steps", str(steps), "--out", str(out), "--resume"])
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


RESEED = "the checkpoint was saved by 2 processes, this run has 1: random streams are re-seeded"


def test_a_two_process_checkpoint_resumes_in_one_process_with_the_saved_values(runs, tmp_path, deterministic):
    out = _copy_run(runs, tmp_path)
    messages = _resume_here(out, STEPS)  # resumes at the last step: nothing left to train
    assert [m for m in messages if m.startswith(("resume", "the checkpoint"))] == [
        RESEED + ", so the run is not bit-identical to an uninterrupted one"]
    assert_states_equal(_final(out), _final(runs / "fsdp"))


def test_resume_falls_back_past_a_damaged_shard_naming_it(runs, tmp_path, deterministic):
    out = _copy_run(runs, tmp_path)
    newest = out / "checkpoints" / f"step-{STEPS:08d}"
    data = bytearray((newest / "__1_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / "__1_0.distcp").write_bytes(bytes(data))
    messages = [m for m in _resume_here(out, STEPS) if m.startswith(("resume", "the checkpoint"))]
    assert messages[0].startswith(f"resume: refusing checkpoint {newest / '__1_0.distcp'}: SHA-256 ")
    assert messages[1] == (f"resume: resuming from {newest.with_name(f'step-{STEPS - EVERY:08d}')} "
                           f"(step {STEPS - EVERY}), the newest checkpoint that verifies")
    assert messages[2].startswith(RESEED) and len(messages) == 3
    # the last 10 steps in one process: what the two did, up to rounding (as in the first test)
    for name, value in _final(runs / "fsdp").items():
        torch.testing.assert_close(_final(out)[name], value, rtol=0, atol=1e-6)
    assert load_checkpoint(newest)["step"] == STEPS  # saved anew, as a plain checkpoint of one process


def test_resume_refuses_when_a_shard_file_is_missing_from_every_checkpoint(runs, tmp_path, deterministic):
    out = _copy_run(runs, tmp_path)
    for _, folder in list_checkpoints(out / "checkpoints"):
        (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"none of its 2 checkpoints verifies, so the run cannot resume:\n"
                                              rf".*step-{STEPS:08d}/__0_0\.distcp: missing;\n"
                                              rf".*step-{STEPS - EVERY:08d}/__0_0\.distcp: missing"):
        _resume_here(out, STEPS)


# Forged manifests (format kept): → the message.
MANIFEST_FORGERIES = {
    "world-size-3": (lambda m: {**m, "world_size": 3}, r"lists no SHA-256 for __2_0\.distcp"),
    "world-size-huge": (lambda m: {**m, "world_size": 10**9}, r"world_size: expected an int from 1 to the number"),
    "world-size-string": (lambda m: {**m, "world_size": "2"}, r"world_size: expected an int .* got '2'"),
    "world-size-1": (lambda m: {**m, "world_size": 1}, r"lists '__1_0\.distcp', which is not a file of a"),
    "shard-unlisted": (lambda m: {**m, "sha256": {k: v for k, v in m["sha256"].items() if k != "__1_0.distcp"}},
                       r"lists no SHA-256 for __1_0\.distcp"),
    "step-other": (lambda m: {**m, "step": 7}, r"step: expected the folder's step \(40\), got 7"),
}


@pytest.mark.parametrize("how", MANIFEST_FORGERIES)
def test_verify_sharded_checkpoint_refuses_a_forged_manifest(runs, tmp_path, how):
    folder = _copy_run(runs, tmp_path) / "checkpoints" / f"step-{STEPS:08d}"
    forge, message = MANIFEST_FORGERIES[how]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps(forge(manifest)))
    with pytest.raises(CheckpointError, match=message):
        verify_sharded_checkpoint(folder)


# ---- argument checks, in this process on a one-rank process group ----

@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _run_parts():
    model = train_script.MLP(0.0)
    x = torch.randn(8, train_script.FEATURES)
    return model, (lambda net, batch: net(batch).square().mean()), (lambda step, rank, world: x)


def _sharded_on_one_rank(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (1,)))


def test_shard_model_in_one_process_returns_the_model_unchanged():
    model = train_script.MLP(0.0)
    assert shard_model(model) is model and not is_sharded(model)


def test_ddp_refuses_a_sharded_model(one_rank_group):
    model, loss_fn, get_batch = _run_parts()
    _sharded_on_one_rank(model)
    with pytest.raises(ValueError, match=r"model: its parameters are DTensors .* pass TrainConfig\(parallel='fsdp'\)"):
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, get_batch,
              TrainConfig(steps=1, progress=False))


def test_fsdp_under_torchrun_refuses_a_model_that_is_not_sharded(one_rank_group, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun's second process would see; the group exists already
    monkeypatch.setenv("RANK", "0")
    model, loss_fn, get_batch = _run_parts()
    with pytest.raises(ValueError, match=r"call slimrate\.train\.shard_model\(model\) before building the optimizer"):
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, get_batch,
              TrainConfig(steps=1, progress=False, parallel="fsdp"))


def test_a_plain_checkpoint_is_refused_for_a_sharded_model(one_rank_group, tmp_path):
    model, loss_fn, get_batch = _run_parts()
    config = TrainConfig(steps=2, out_dir=str(tmp_path), checkpoint_every=2, progress=False, tensorboard=False)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, get_batch, config)
    sharded, _, _ = _run_parts()
    _sharded_on_one_rank(sharded)
    config = TrainConfig(steps=4, out_dir=str(tmp_path), resume=True, progress=False, parallel="fsdp")
    with pytest.raises(ValueError, match=r"step-00000002: a checkpoint of a model that was not sharded .* cannot be "
                                         r"resumed into a sharded one"):
        train(sharded, torch.optim.SGD(sharded.parameters(), lr=0.1), loss_fn, get_batch, config)


def test_config_rejects_an_unknown_parallel_mode():
    with pytest.raises(ValueError, match=r"parallel: expected one of ddp, fsdp, got 'zero'"):
        TrainConfig(steps=1, parallel="zero")


def test_slimrate_compress_turns_the_runs_sharded_checkpoint_into_a_slim_file(runs, tmp_path):
    """The FSDP run ends in a .slim file: its last checkpoint (manifest verified, each tensor assembled from the
    two ranks' chunks) compressed and decompressed gives the run's final weights within the bound."""
    from slimrate import SlimFile
    from slimrate.cli import main

    max_error = 1e-3
    folder = runs / "fsdp" / "checkpoints" / f"step-{STEPS:08d}"
    slim, out = tmp_path / "run.slim", tmp_path / "run.safetensors"
    assert main(["compress", str(folder), "-o", str(slim), "--max-error", str(max_error)]) == 0
    assert main(["decompress", str(slim), "-o", str(out)]) == 0
    final, got = _final(runs / "fsdp"), load_file(str(out))
    assert sorted(got) == sorted(final)  # the model's tensors only: no optimizer moments, no EMA
    for name, tensor in final.items():
        bound = max_error if tensor.dim() >= 2 else 0  # 1-D tensors are stored losslessly
        error = (got[name].double() - tensor.double()).abs().max().item()
        assert error <= bound * (1 + 1e-6), f"{name}: max error {error:.3g} > {bound}"
    with SlimFile(slim) as f:
        source = json.loads(f.metadata()["slimrate.source"])
    assert (source["step"], source["world_size"]) == (STEPS, 2)

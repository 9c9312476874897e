"""The shared training loop: hooks and their order, logging, checkpoints (atomic, checked, resumable),
kill-and-resume in a real subprocess, and torchrun/DDP with two CPU processes."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from slimrate.backslash import RateConstraint, RateConstraintHook
from slimrate.train import (
    CheckpointError,
    TrainConfig,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_jsonl,
    rng_state,
    seed_everything,
    set_rng_state,
    train,
)
from slimrate.train.checkpoint import CHECKPOINT_FILES, write_manifest

from helpers import assert_states_equal, finish_process, kill_after_checkpoint, start_process, start_torchrun

SCRIPT = Path(__file__).with_name("train_script.py")


def make_run(dropout: float = 0.1, optimizer: str = "adam", lr: float = 1e-2, seed: int = 0):
    """A tiny MLP regression set-up: (model, optimizer, loss_fn, get_batch)."""
    data = torch.Generator().manual_seed(99)
    x, w = torch.randn(128, 6, generator=data), torch.randn(6, 1, generator=data)
    y = torch.tanh(x @ w)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))

    def get_batch(step, rank, world_size):
        idx = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(step))
        return x[idx.tensor_split(world_size)[rank]], y[idx.tensor_split(world_size)[rank]]

    def loss_fn(net, batch):
        return F.mse_loss(net(batch[0]), batch[1])

    return model, opt, loss_fn, get_batch


def run_resumable(out_dir, steps, **config):
    """One run with Adam, dropout, StepLR and a RateConstraint hook; returns (model, optimizer,
    scheduler, constraint)."""
    model, opt, loss_fn, get_batch = make_run()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    constraint = RateConstraint(model, lam=1e-2, mode="grad")
    cfg = TrainConfig(steps=steps, out_dir=str(out_dir), progress=False, tensorboard=False, log_every=5, **config)
    train(model, opt, loss_fn, get_batch, cfg, scheduler=scheduler, hooks=[constraint])
    return model, opt, scheduler, constraint


# ---- the loop in-process ----

@pytest.mark.parametrize("mode", ["loss", "decoupled"])
def test_loop_matches_hand_written_loop_with_clipping_and_rate_constraint(mode):
    model, opt, loss_fn, get_batch = make_run(dropout=0.0)
    train(model, opt, loss_fn, get_batch, TrainConfig(steps=15, max_grad_norm=0.5, progress=False),
          hooks=[RateConstraint(model, lam=1e-2, mode=mode)])

    ref, ref_opt, _, _ = make_run(dropout=0.0)
    constraint = RateConstraint(ref, lam=1e-2, mode=mode)
    for step in range(15):
        loss = loss_fn(ref, get_batch(step, 0, 1))
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        if mode == "loss":
            constraint.step()  # after clipping: the rate gradient itself is not clipped
        ref_opt.step()
        if mode == "decoupled":
            constraint.step()
    assert_states_equal(model.state_dict(), ref.state_dict())


def test_hooks_are_called_in_order_with_the_step_index():
    calls = []

    class Recorder:
        def after_backward(self, step):
            calls.append(("after_backward", step, all(p.grad is not None for p in model.parameters())))

        def after_step(self, step):
            calls.append(("after_step", step, scheduler.last_epoch))

    model, opt, loss_fn, get_batch = make_run()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    train(model, opt, loss_fn, get_batch, TrainConfig(steps=3, progress=False), scheduler=scheduler,
          hooks=[Recorder()])
    # after_step sees the scheduler already stepped (last_epoch = step + 1)
    assert calls == [("after_backward", 0, True), ("after_step", 0, 1), ("after_backward", 1, True),
                     ("after_step", 1, 2), ("after_backward", 2, True), ("after_step", 2, 3)]


def test_evaluate_runs_every_k_steps_and_at_the_end_in_eval_mode_without_grad():
    seen = []

    def evaluate(net):
        seen.append((net.training, torch.is_grad_enabled()))
        return {"n": torch.tensor(len(seen))}

    model, opt, loss_fn, get_batch = make_run()
    result = train(model, opt, loss_fn, get_batch, TrainConfig(steps=25, eval_every=10, progress=False),
                   evaluate=evaluate)
    assert seen == [(False, False)] * 3  # steps 10, 20 and the end (25)
    assert result.eval == {"n": 3.0} and result.step == 25 and model.training


def test_metrics_go_to_jsonl_and_tensorboard_with_expected_keys(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, opt, loss_fn, get_batch = make_run()
    cfg = TrainConfig(steps=20, out_dir=str(tmp_path), log_every=5, eval_every=10, max_grad_norm=1.0, progress=False)
    result = train(model, opt, loss_fn, get_batch, cfg, evaluate=lambda net: {"mse": 0.5},
                   hooks=[RateConstraintHook(RateConstraint(model, lam=1e-3))])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    for r in train_records:
        assert set(r) == {"step", "loss", "lr", "samples_per_s", "grad_norm", "backslash_rate", "backslash_nu",
                          "backslash_lam"}
        assert r["backslash_lam"] == 1e-3
        assert r["lr"] == 1e-2 and r["samples_per_s"] > 0 and r["loss"] > 0
    assert [(r["step"], r["eval/mse"]) for r in records if "eval/mse" in r] == [(10, 0.5), (20, 0.5)]
    assert result.loss == train_records[-1]["loss"]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/grad_norm", "train/backslash_rate",
            "eval/mse"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]


def test_autocast_bfloat16_runs_the_forward_in_bfloat16_on_cpu():
    dtypes = []
    model, opt, loss_fn, get_batch = make_run()

    def loss_in_bf16(net, batch):
        out = net(batch[0])
        dtypes.append(out.dtype)
        return F.mse_loss(out.float(), batch[1])

    result = train(model, opt, loss_in_bf16, get_batch,
                   TrainConfig(steps=5, autocast_dtype=torch.bfloat16, progress=False))
    assert dtypes == [torch.bfloat16] * 5 and np.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_seed_everything_and_rng_state_round_trip():
    seed_everything(5)
    saved = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(saved)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


@pytest.mark.parametrize("config,message", [
    (dict(steps=0), "steps: expected an int >= 1"),
    (dict(steps=5, log_every=0), "log_every: expected an int >= 1"),
    (dict(steps=5, max_grad_norm=0.0), "max_grad_norm"),
    (dict(steps=5, autocast_dtype=torch.float16), "float16 needs gradient scaling"),
    (dict(steps=5, resume=True), "out_dir: resume need"),
    (dict(steps=5, checkpoint_every=2), "out_dir: checkpoint_every need"),
    (dict(steps=5, out_dir="x", checkpoint_every=-1), "checkpoint_every: expected an int >= 0"),
    (dict(steps=5, out_dir="x", keep_checkpoints=0), "keep_checkpoints: expected an int >= 1"),
])
def test_config_rejects_bad_values(config, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**config)


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_names_the_install_command(tmp_path):
    model, opt, loss_fn, get_batch = make_run()
    with pytest.raises(ImportError, match="pip install wandb"):
        train(model, opt, loss_fn, get_batch, TrainConfig(steps=2, out_dir=str(tmp_path), wandb=True))
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before any work


# ---- checkpoints and resume (the checkpoint format itself: test_train_checkpoint.py) ----

def damage_checkpoint(folder, how):
    """Make the checkpoint ``folder`` fail verification in one of several ways."""
    if how == "manifest-deleted":
        (folder / "manifest.json").unlink()
    elif how == "file-added":
        (folder / "notes.txt").write_text("added by hand")
    else:  # a flipped byte in tensors.safetensors or state.json
        data = bytearray((folder / how).read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / how).write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["tensors.safetensors", "state.json", "manifest-deleted", "file-added"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies_and_says_so(tmp_path, how):
    whole = run_resumable(tmp_path / "whole", 12, checkpoint_every=2)
    run_resumable(tmp_path / "cut", 8, checkpoint_every=2)  # keeps two by default: steps 6 and 8
    newest = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    damage_checkpoint(newest, how)
    with pytest.warns(UserWarning) as warned:
        resumed = run_resumable(tmp_path / "cut", 12, checkpoint_every=2, resume=True)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2 and messages[0].startswith(f"resume: refusing checkpoint {newest}")
    assert messages[1] == (f"resume: resuming from {newest.with_name('step-00000006')} (step 6), the newest "
                           "checkpoint that verifies")
    for a, b in zip(whole, resumed, strict=True):  # model, optimizer, scheduler, RateConstraint
        assert_states_equal(a.state_dict(), b.state_dict())
    assert [s for s, _ in list_checkpoints(tmp_path / "cut" / "checkpoints")] == [10, 12]  # step 8 saved anew


def test_resume_raises_listing_every_checkpoint_when_none_verifies(tmp_path):
    run_resumable(tmp_path, 4, checkpoint_every=2)
    for _, path in list_checkpoints(tmp_path / "checkpoints"):
        damage_checkpoint(path, "state.json")
    model, opt, loss_fn, get_batch = make_run()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=6, out_dir=str(tmp_path), checkpoint_every=2, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"none of its 2 checkpoints verifies, so the run cannot resume:\n"
                                              r".*step-00000004/state\.json: SHA-256 .*;\n"
                                              r".*step-00000002/state\.json: SHA-256 .*; "
                                              r"restore one, or move the folder away to start from step 0"):
        train(model, opt, loss_fn, get_batch, config)
    assert_states_equal(model.state_dict(), before)  # nothing trained


def test_resume_refuses_a_state_without_the_runs_keys(tmp_path):
    """A state.json that verifies (checksums recomputed) but lacks the model is refused like a damaged one."""
    run_resumable(tmp_path, 2, checkpoint_every=2)
    folder = latest_checkpoint(tmp_path / "checkpoints")
    state = json.loads((folder / "state.json").read_text())
    del state["model"]
    (folder / "state.json").write_text(json.dumps(state))
    write_manifest(folder, "slimrate-checkpoint", 1, CHECKPOINT_FILES, step=2)
    with pytest.raises(CheckpointError, match=r"none of its 1 checkpoints verifies, so the run cannot resume:\n"
                                              r".*step-00000002/state\.json: 'model': expected dict, got None"):
        run_resumable(tmp_path, 4, checkpoint_every=2, resume=True)


def test_resume_with_another_model_names_the_checkpoint(tmp_path):
    run_resumable(tmp_path, 2, checkpoint_every=2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    _, _, loss_fn, get_batch = make_run()
    config = TrainConfig(steps=4, out_dir=str(tmp_path), checkpoint_every=2, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"(?s)step-00000002: does not fit this run \(RuntimeError: Error\(s\) in "
                                         r"loading state_dict.*resume with the model, optimizer"):
        train(model, torch.optim.Adam(model.parameters()), loss_fn, get_batch, config)


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tmp_path):
    model, opt, loss_fn, get_batch = make_run()
    train(model, opt, loss_fn, get_batch, TrainConfig(steps=2, out_dir=str(tmp_path), checkpoint_every=1,
                                                      progress=False, tensorboard=False))
    with pytest.raises(ValueError, match="already holds checkpoints .* pass resume=True"):
        train(model, opt, loss_fn, get_batch, TrainConfig(steps=4, out_dir=str(tmp_path), progress=False))


def test_resume_in_process_is_bit_identical_and_logs_each_step_once(tmp_path):
    whole = run_resumable(tmp_path / "whole", 20, checkpoint_every=5)
    # A run that got to step 15 but whose newest surviving checkpoint is step 10, as after a kill.
    run_resumable(tmp_path / "cut", 15, checkpoint_every=5, keep_checkpoints=3)
    for step, path in list_checkpoints(tmp_path / "cut" / "checkpoints"):
        if step > 10:
            __import__("shutil").rmtree(path)
    resumed = run_resumable(tmp_path / "cut", 20, checkpoint_every=5, resume=True)
    for a, b in zip(whole, resumed, strict=True):  # model, optimizer, scheduler, RateConstraint
        assert_states_equal(a.state_dict(), b.state_dict())
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == [5, 10, 15, 20]
    # the resumed run's records after step 10 are its own: same losses as the uninterrupted run
    assert read_jsonl(tmp_path / "cut" / "metrics.jsonl")[-1]["loss"] == read_jsonl(
        tmp_path / "whole" / "metrics.jsonl")[-1]["loss"]


# ---- real processes ----


def test_run_killed_mid_way_and_resumed_ends_bit_identical(tmp_path):
    common = [sys.executable, str(SCRIPT), "--steps", "200", "--checkpoint-every", "20"]
    reference = start_process(common + ["--out", str(tmp_path / "whole")])
    victim = start_process(common + ["--out", str(tmp_path / "run"), "--step-delay", "0.03"])
    kill_after_checkpoint(victim, tmp_path / "run" / "checkpoints", 60, 200)
    finish_process(start_process(common + ["--out", str(tmp_path / "run"), "--resume"]), "resumed run")
    finish_process(reference, "uninterrupted run")

    assert_states_equal(load_file(str(tmp_path / "run" / "final-rank0.safetensors")),
                        load_file(str(tmp_path / "whole" / "final-rank0.safetensors")))
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / name / "checkpoints")) for name in ("run", "whole"))
    for key in ("step", "optimizer", "scheduler", "hooks", "rng"):
        assert_states_equal(a[key], b[key], key)
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(10, 201, 10))


def test_torchrun_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    args = [str(SCRIPT), "--steps", "30", "--optimizer", "sgd", "--dropout", "0", "--global-batch", "32"]
    ddp = start_torchrun(args + ["--out", str(tmp_path / "ddp")])
    single = start_process([sys.executable] + args + ["--out", str(tmp_path / "single")])
    finish_process(ddp, "torchrun --nproc_per_node=2")
    finish_process(single, "single process")

    rank0, rank1 = (load_file(str(tmp_path / "ddp" / f"final-rank{r}.safetensors")) for r in (0, 1))
    assert_states_equal(rank0, rank1)  # DDP keeps the replicas identical
    one = load_file(str(tmp_path / "single" / "final-rank0.safetensors"))
    # Two 16-sample means averaged by all-reduce vs one 32-sample mean: the same gradient up to fp32
    # rounding (~1 ulp per step); after 30 SGD steps weights of size ~0.4 differed by <= 9e-8 (3 ulp)
    # when measured, so atol 1e-6 leaves a 10x margin, while training on one 16-sample shard alone
    # (no gradient averaging) moves them by 0.1.
    for name in one:
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    logged, single_logged = ([r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
                             for name in ("ddp", "single"))
    assert logged == pytest.approx(single_logged, rel=1e-5)  # rank 0 logs the loss averaged over ranks

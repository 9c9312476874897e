"""A run's checkpoints: what one holds, and resuming from the newest one that verifies (docs/training.md §3, §6).

A checkpoint that does not verify (a damaged or edited file, a missing manifest, anything ``load_checkpoint``
refuses) is skipped with a warning naming it and why, and the run resumes from the newest one before it that
verifies, with a warning naming that one; the refused ones are left in place and replaced when the run reaches
their steps again.  When checkpoints exist but none verifies, resuming raises ``CheckpointError`` listing each
one and why: a run asked to resume never restarts from step 0 on its own.  A model sharded with FSDP2 is
saved as a sharded checkpoint (``slimrate.train.sharded_checkpoint``); under torchrun, rank 0 picks the
checkpoint to resume from and tells the others.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from slimrate.train.checkpoint import STATE_FILE, CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from slimrate.train.distributed import DistributedInfo, broadcast_object, gather_objects
from slimrate.train.fsdp import is_sharded
from slimrate.train.rng import rng_state, seed_everything, set_rng_state
from slimrate.train.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_sharded_rest,
    load_sharded_state,
    save_sharded_checkpoint,
)

# The keys of a run's state.json and the types their values must have.
STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int, "world_size": int, "config": dict, "rng": list, "model": dict, "optimizer": dict,
    "scheduler": (dict, type(None)), "hooks": list}
# A sharded checkpoint's state.json: model, optimizer and the hooks' states are in DCP's files (a hook may hold
# DTensors, e.g. an EMA of sharded weights); "hooks" counts them.
SHARDED_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    **{k: v for k, v in STATE_TYPES.items() if k not in ("model", "optimizer")}, "hooks": int}


def save_run(directory: Path, step: int, config, model, optimizer, scheduler, hooks: list[Any],
             info: DistributedInfo) -> None:
    """Checkpoint the run at ``step``: a sharded checkpoint when the model is sharded (each rank writes its part),
    else a plain one (rank 0 writes).  Every rank must call it (it gathers the RNG states)."""
    rng = gather_objects(rng_state(), info)  # a collective: every rank takes part
    state = {"step": step, "world_size": info.world_size, "config": config.to_json(), "rng": rng,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    hook_states = [h.state_dict() for h in stateful_hooks(hooks)]
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        save_sharded_checkpoint(directory, step, {"model": model_state, "optimizer": optimizer_state,
                                                  "hooks": hook_states},
                                {**state, "hooks": len(hook_states)}, config.keep_checkpoints, info)
    elif info.is_main:
        save_checkpoint(directory, step, {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "hooks": hook_states}, keep=config.keep_checkpoints)


def stateful_hooks(hooks: list[Any]) -> list[Any]:
    """The hooks that are checkpointed: those with state_dict and load_state_dict (stateless ones, e.g.
    a logging hook, may be added or dropped on resume)."""
    return [h for h in hooks if hasattr(h, "state_dict") and hasattr(h, "load_state_dict")]


def resume_run(config, directory: Path, model, optimizer, scheduler, hooks: list[Any], info: DistributedInfo) -> int:
    """Restore the run from the newest checkpoint under ``directory`` that verifies; returns the step to start
    from (0 when there is no checkpoint).  ValueError when there are checkpoints but ``config.resume`` is off,
    or the checkpoint does not fit this run's model, optimizer, scheduler or hooks."""
    found = list_checkpoints(directory)
    if not found:
        return 0
    if not config.resume:
        raise ValueError(f"out_dir: {config.out_dir} already holds checkpoints (newest: {found[-1][1].name}); pass "
                         "resume=True to continue that run, or choose an empty out_dir")
    path, sharded, state = _chosen_checkpoint(found, info)
    if not sharded and is_sharded(model):
        raise ValueError(f"{path}: a checkpoint of a model that was not sharded (one process or DDP) cannot be "
                         "resumed into a sharded one; resume it as it was saved (parallel='ddp', or one process)")
    try:
        if sharded:
            _restore_sharded(path, state, model, optimizer, hooks, info)
        else:
            _restore_plain(state, model, optimizer, hooks)
        _restore_scheduler(state, scheduler)
        if len(state["rng"]) == info.world_size:
            set_rng_state(state["rng"][info.rank])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # load_state_dict's errors, hooks' own
        raise ValueError(f"{path}: does not fit this run ({type(e).__name__}: {e}); resume with the model, "
                         "optimizer, scheduler and hooks of the run that saved it") from e
    if len(state["rng"]) != info.world_size:
        warnings.warn(f"the checkpoint was saved by {len(state['rng'])} processes, this run has "
                      f"{info.world_size}: random streams are re-seeded, so the run is not bit-identical "
                      "to an uninterrupted one", stacklevel=4)
        seed_everything(config.seed + info.rank + state["step"])
    return state["step"]


def _chosen_checkpoint(found: list[tuple[int, Path]], info: DistributedInfo) -> tuple[Path, bool, dict[str, Any]]:
    """(path, sharded, state) of the checkpoint to resume from, on every rank: rank 0 verifies and picks
    (``_newest_verified``) and sends the others its verdict, with a sharded checkpoint's state.json (the DCP
    files are read by every rank later); a plain checkpoint is loaded by each rank (the whole state)."""
    choice: Any = None
    if info.is_main:
        try:
            choice = _newest_verified(found, info)
        except CheckpointError as e:
            choice = e
    if info.is_distributed:
        whole = not info.is_main or isinstance(choice, CheckpointError) or choice[1]  # all but a plain state
        received = broadcast_object(choice if whole else (choice[0], False, None), info)
        choice = choice if info.is_main else received
    if isinstance(choice, CheckpointError):
        raise choice
    path, sharded, state = choice
    return path, sharded, load_checkpoint(path) if state is None else state


def _newest_verified(found: list[tuple[int, Path]], info: DistributedInfo) -> tuple[Path, bool, dict[str, Any]]:
    """(path, sharded, state) of the newest of ``found`` that verifies and holds a run's state (for a sharded
    checkpoint: its state.json's); when that is not the newest, warns naming each newer one refused and why,
    and the one resumed from; CheckpointError listing them all when none verifies."""
    refused: list[CheckpointError] = []
    for step, path in reversed(found):
        sharded = is_sharded_checkpoint(path)
        try:
            state = load_sharded_rest(path) if sharded else load_checkpoint(path)
            _check_state(state, step, path / STATE_FILE, SHARDED_STATE_TYPES if sharded else STATE_TYPES)
        except CheckpointError as e:
            refused.append(e)
            continue
        for error in refused:
            warnings.warn(f"resume: refusing checkpoint {error.reason}", stacklevel=6)
        if refused:
            warnings.warn(f"resume: resuming from {path} (step {step}), the newest checkpoint that verifies",
                          stacklevel=6)
        return path, sharded, state
    raise CheckpointError(f"{found[0][1].parent}: none of its {len(found)} checkpoints verifies, so the run cannot "
                          "resume:\n" + ";\n".join(e.reason for e in refused),
                          "restore one, or move the folder away to start from step 0")


def _check_state(state: Any, step: int, path: Path, types: dict[str, type | tuple[type, ...]]) -> None:
    """CheckpointError naming state.json unless ``state`` has every key of ``types`` with its type and the
    folder's step."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key, kind in types.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: {key!r}: expected {_names(kind)}, got {value!r:.80}")
    if state["step"] != step:
        raise CheckpointError(f"{path}: step {state['step']}, but the folder is that of step {step}")


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def _restore_plain(state: dict[str, Any], model, optimizer, hooks: list[Any]) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _load_hooks(hooks, state["hooks"])


def _restore_sharded(path: Path, state: dict[str, Any], model, optimizer, hooks: list[Any],
                     info: DistributedInfo) -> None:
    """Every rank reads its part of the DCP files into this run's state dicts (re-sharded when the run has
    another layout: DCP reads the saved chunks each tensor needs), then loads them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    stateful = stateful_hooks(hooks)
    _check_hook_count(state["hooks"], len(stateful))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    hook_states = [h.state_dict() for h in stateful]  # filled in place: tensors copied into, values replaced
    load_sharded_state(path, {"model": model_state, "optimizer": optimizer_state, "hooks": hook_states}, info)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    _load_hooks(hooks, hook_states)


def _restore_scheduler(state: dict[str, Any], scheduler) -> None:
    if (state["scheduler"] is None) != (scheduler is None):
        raise ValueError(f"scheduler: the checkpoint was saved {'without' if scheduler else 'with'} one")
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])


def _load_hooks(hooks: list[Any], states: list[Any]) -> None:
    stateful = stateful_hooks(hooks)
    _check_hook_count(len(states), len(stateful))
    for hook, hook_state in zip(stateful, states, strict=True):
        hook.load_state_dict(hook_state)


def _check_hook_count(saved: int, stateful: int) -> None:
    if saved != stateful:
        raise ValueError(f"hooks: the checkpoint holds the states of {saved} hooks, this run has "
                         f"{stateful} hooks with a state_dict (same hooks, same order)")

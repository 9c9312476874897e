"""A run's checkpoints: what one holds, and resuming from the newest one that verifies (docs/training.md §3).

A checkpoint that does not verify (a damaged or edited file, a missing manifest, anything ``load_checkpoint``
refuses) is skipped with a warning naming it and why, and the run resumes from the newest one before it that
verifies, with a warning naming that one; the refused ones are left in place and replaced when the run reaches
their steps again.  When checkpoints exist but none verifies, resuming raises ``CheckpointError`` listing each
one and why: a run asked to resume never restarts from step 0 on its own.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from slimrate.train.checkpoint import STATE_FILE, CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from slimrate.train.distributed import DistributedInfo, gather_objects
from slimrate.train.rng import rng_state, seed_everything, set_rng_state

# The keys of a run's state.json and the types their values must have.
STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int, "world_size": int, "config": dict, "rng": list, "model": dict, "optimizer": dict,
    "scheduler": (dict, type(None)), "hooks": list}


def save_run(directory: Path, step: int, config, model, optimizer, scheduler, hooks: list[Any],
             info: DistributedInfo) -> None:
    """Checkpoint the run at ``step`` (rank 0 writes; every rank must call it, it gathers the RNG states)."""
    rng = gather_objects(rng_state(), info)  # a collective: every rank takes part, rank 0 writes
    if not info.is_main:
        return
    state = {"step": step, "world_size": info.world_size, "config": config.to_json(), "rng": rng,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "hooks": [h.state_dict() for h in stateful_hooks(hooks)]}
    save_checkpoint(directory, step, state, keep=config.keep_checkpoints)


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
    path, state = _newest_verified(found, info)
    try:
        _restore(state, model, optimizer, scheduler, hooks)
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


def _newest_verified(found: list[tuple[int, Path]], info: DistributedInfo) -> tuple[Path, dict[str, Any]]:
    """(path, state) of the newest of ``found`` that loads and holds a run's state; when that is not the newest,
    warns (rank 0) naming each newer one refused and why, and the one resumed from; CheckpointError listing them
    all when none verifies."""
    refused: list[CheckpointError] = []
    for step, path in reversed(found):
        try:
            state = load_checkpoint(path)
            _check_state(state, step, path / STATE_FILE)
        except CheckpointError as e:
            refused.append(e)
            continue
        if refused and info.is_main:
            for error in refused:
                warnings.warn(f"resume: refusing checkpoint {error.reason}", stacklevel=5)
            warnings.warn(f"resume: resuming from {path} (step {step}), the newest checkpoint that verifies",
                          stacklevel=5)
        return path, state
    raise CheckpointError(f"{found[0][1].parent}: none of its {len(found)} checkpoints verifies, so the run cannot "
                          "resume:\n" + ";\n".join(e.reason for e in refused),
                          "restore one, or move the folder away to start from step 0")


def _check_state(state: Any, step: int, path: Path) -> None:
    """CheckpointError naming state.json unless ``state`` has every key of STATE_TYPES with its type and the
    folder's step."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key, kind in STATE_TYPES.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: {key!r}: expected {_names(kind)}, got {value!r:.80}")
    if state["step"] != step:
        raise CheckpointError(f"{path}: step {state['step']}, but the folder is that of step {step}")


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def _restore(state: dict[str, Any], model, optimizer, scheduler, hooks: list[Any]) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if (state["scheduler"] is None) != (scheduler is None):
        raise ValueError(f"scheduler: the checkpoint was saved {'without' if scheduler else 'with'} one")
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    stateful = stateful_hooks(hooks)
    if len(state["hooks"]) != len(stateful):
        raise ValueError(f"hooks: the checkpoint holds the states of {len(state['hooks'])} hooks, this run has "
                         f"{len(stateful)} hooks with a state_dict (same hooks, same order)")
    for hook, hook_state in zip(stateful, state["hooks"], strict=True):
        hook.load_state_dict(hook_state)

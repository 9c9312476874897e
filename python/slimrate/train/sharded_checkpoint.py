"""Sharded checkpoints of an FSDP2 run: each rank writes its own part through torch.distributed.checkpoint.

Layout (docs/training.md §6): ``<out_dir>/checkpoints/step-00000060/`` holding DCP's files (``.metadata`` and
``__<rank>_0.distcp`` for each rank, written by ``torch.distributed.checkpoint.save`` with a
``FileSystemWriter``), ``tensors.safetensors`` and ``state.json`` (the rest of the state, rank 0's, in the
format of a plain checkpoint) and ``manifest.json`` (format ``slimrate-sharded-checkpoint``, version 1, step,
world_size, and the SHA-256 of every other file).  Every rank writes into one hidden temporary folder; rank 0
writes the manifest last and renames the folder once all ranks are done, so a run killed mid-save leaves
either no new checkpoint or a complete one.  DCP re-shards on load: a checkpoint saved by N ranks loads into
a model sharded over M ranks, or into a plain model in one process.  torch.distributed.checkpoint is imported
when first used (it adds about a second to every ``import slimrate.train`` otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slimrate.train.checkpoint import (
    CHECKPOINT_FIX,
    MANIFEST_FILE,
    STATE_FILE,
    TEMP_PREFIX,
    TENSORS_FILE,
    CheckpointError,
    check_manifest_step,
    checkpoint_dir,
    publish_checkpoint,
    read_json,
    read_state_files,
    remove_temp_folders,
    verify_manifest,
    write_manifest,
    write_state_files,
)
from slimrate.train.distributed import DistributedInfo, barrier

SHARDED_FORMAT = "slimrate-sharded-checkpoint"
SHARDED_VERSION = 1
DCP_METADATA_FILE = ".metadata"


def sharded_files(world_size: int) -> tuple[str, ...]:
    """The files a sharded checkpoint of ``world_size`` ranks holds besides its manifest."""
    return (DCP_METADATA_FILE, *(f"__{rank}_0.distcp" for rank in range(world_size)), TENSORS_FILE, STATE_FILE)


def save_sharded_checkpoint(directory: str | os.PathLike, step: int, sharded: dict[str, Any], rest: dict[str, Any],
                            keep: int, info: DistributedInfo) -> Path:
    """Write the checkpoint of ``step`` under ``directory``: ``sharded`` (a state dict of DTensors and other
    values, e.g. ``{"model": ..., "optimizer": ...}`` from ``get_state_dict``) through DCP, each rank its part;
    ``rest`` (rank 0's: nested tensors, numbers, strings) as tensors.safetensors + state.json; the manifest;
    then keep the newest ``keep`` as ``save_checkpoint`` does.  Every rank must call it.  Returns the folder."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final = checkpoint_dir(directory, step)
    temp = directory / f"{TEMP_PREFIX}{final.name}"  # one name all ranks know without talking
    if info.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        remove_temp_folders(directory)
        temp.mkdir()
    barrier(info)
    # Returns on every rank once all have written their files: rank 0 writes .metadata after gathering them.
    dcp.save(sharded, storage_writer=dcp.FileSystemWriter(temp), no_dist=not info.is_distributed)
    if info.is_main:
        write_state_files(temp, rest)
        write_manifest(temp, SHARDED_FORMAT, SHARDED_VERSION, sharded_files(info.world_size), step=step,
                       world_size=info.world_size)
        publish_checkpoint(temp, final, keep)
    barrier(info)  # no rank goes on (to the next save's clean-up, say) before the checkpoint is in place
    return final


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the folder's manifest says it is a sharded checkpoint (nothing verified)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == SHARDED_FORMAT


def verify_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a sharded checkpoint folder before anything in it is used: its manifest (format, version, an int
    world_size, the folder's step) lists the SHA-256 of exactly ``sharded_files(world_size)``, the folder holds
    nothing else, and each file has its checksum.  Returns the manifest; ``CheckpointError`` naming the file
    and what is wrong otherwise."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    head = read_json(manifest_path, CHECKPOINT_FIX) if manifest_path.is_file() else None
    world_size = 1  # until the manifest is known to be one of ours; verify_manifest then says what is wrong
    if isinstance(head, dict) and head.get("format") == SHARDED_FORMAT:
        world_size = head.get("world_size")
        listed = head.get("sha256")
        if type(world_size) is not int or not 1 <= world_size <= (len(listed) if isinstance(listed, dict) else 1):
            raise CheckpointError(f"{manifest_path}: world_size: expected an int from 1 to the number of shard "
                                  f"files listed, got {world_size!r:.80}", CHECKPOINT_FIX)
    manifest = verify_manifest(path, SHARDED_FORMAT, SHARDED_VERSION, sharded_files(world_size), CHECKPOINT_FIX,
                               whole_folder=True)
    check_manifest_step(manifest, path)
    return manifest


def load_sharded_rest(path: str | os.PathLike) -> dict[str, Any]:
    """Verify the sharded checkpoint ``path`` (``verify_sharded_checkpoint``) and return the state of its
    tensors.safetensors + state.json; the DCP part is read by ``load_sharded_state``."""
    verify_sharded_checkpoint(path)
    return read_state_files(Path(path))


def load_sharded_state(path: str | os.PathLike, sharded: dict[str, Any], info: DistributedInfo) -> None:
    """Read the DCP part of the checkpoint ``path`` into ``sharded`` in place (DTensors get this rank's shard,
    plain tensors the whole value, other values are replaced): a state dict shaped like the one saved, e.g.
    from ``get_state_dict`` of this run's model and optimizer.  Every rank must call it.  ValueError when the
    saved state does not fit ``sharded`` (a missing key, another shape)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(sharded, storage_reader=dcp.FileSystemReader(path), no_dist=not info.is_distributed)
    except CheckpointException as e:  # a BaseException: rank → (exception, traceback)
        failures = "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                             for rank, (error, _) in e.failures.items())
        raise ValueError(f"{path}: the sharded state does not load ({failures})") from None

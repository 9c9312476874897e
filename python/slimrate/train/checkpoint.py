"""Checkpoints: tensors in safetensors, everything else in JSON, a manifest with SHA-256 checksums.

Layout: ``<out_dir>/checkpoints/step-00000060/`` holding ``tensors.safetensors`` (every tensor of the
saved state: model, optimizer moments, RNG states, ...), ``state.json`` (the rest, with each tensor
replaced by a reference into the safetensors file) and ``manifest.json`` (format, version, step,
and the SHA-256 of the other two files).  A checkpoint is written into a hidden temporary folder,
the manifest last, and only then renamed to its final name, so a run killed mid-write leaves either
no new checkpoint or a complete one; folders without a manifest are never picked up.  Loading
verifies both checksums and raises ``CheckpointError`` on any mismatch.  ``write_manifest`` and
``verify_manifest`` serve any folder of files written together (a DMB model folder, too).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimrate.files import write_text_atomic

CHECKPOINT_FORMAT = "slimrate-checkpoint"
CHECKPOINT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20

# JSON has no tensors, tuples or non-string keys; these markers carry them through state.json.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class CheckpointError(ValueError):
    """A checkpoint (or another folder verified by its manifest, such as a DMB model) is incomplete, corrupt
    or from an unknown format."""


def checkpoint_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a manifest) under ``directory`` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 1) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors, numbers, strings) as the checkpoint of
    ``step`` under ``directory``, atomically; then delete all but the newest ``keep`` checkpoints
    and any temporary folders an interrupted save left behind.  Returns the checkpoint's folder."""
    if keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{_TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_dir(directory, step)
    temp = directory / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
    temp.mkdir()
    store = _TensorStore()
    encoded = _encode(state, store, "")
    save_file(store.tensors, str(temp / TENSORS_FILE), metadata={"format": CHECKPOINT_FORMAT})
    _fsync_file(temp / TENSORS_FILE)
    _write_synced(temp / STATE_FILE, json.dumps(encoded).encode())
    write_manifest(temp, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, (TENSORS_FILE, STATE_FILE), step=step)
    if final.exists():  # this step saved a second time (the loop never does): the new one wins
        shutil.rmtree(final)
    os.rename(temp, final)
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved in the checkpoint folder ``path``, after checking its manifest and checksums;
    tensors come back on the CPU."""
    path = Path(path)
    verify_manifest(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, (TENSORS_FILE, STATE_FILE),
                    fix=f"delete {path} to resume from the checkpoint before it")
    tensors = load_file(str(path / TENSORS_FILE))
    return _decode(json.loads((path / STATE_FILE).read_text()), tensors)


def write_manifest(folder: str | os.PathLike, format_name: str, version: int, files: tuple[str, ...],
                   **fields: Any) -> dict[str, Any]:
    """Write ``folder/manifest.json``: ``format_name``, ``version``, ``fields`` (JSON values) and the SHA-256
    of each of ``files`` (names in ``folder``, already written), atomically; returns the manifest."""
    folder = Path(folder)
    manifest = {"format": format_name, "version": version, **fields,
                "sha256": {name: _sha256(folder / name) for name in files}}
    write_text_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_manifest(folder: str | os.PathLike, format_name: str, version: int, files: tuple[str, ...],
                    fix: str) -> dict[str, Any]:
    """Check ``folder/manifest.json`` (``write_manifest``'s): its format and version, and that each of ``files``
    is present with the SHA-256 it lists.  Returns the manifest; raises ``CheckpointError`` naming the file
    at fault and ending with ``fix`` (what the user can do about it)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_FILE}, so its files cannot be verified (a save that was "
                              f"interrupted, or not a {format_name!r} folder); {fix}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(manifest, dict):
        manifest = {}
    if manifest.get("format") != format_name or manifest.get("version") != version:
        raise CheckpointError(f"{manifest_path}: expected format {format_name!r} version {version}, got "
                              f"{manifest.get('format')!r} version {manifest.get('version')!r}; {fix}")
    sums = manifest.get("sha256")
    for name in files:
        if not isinstance(sums, dict) or not isinstance(sums.get(name), str):
            raise CheckpointError(f"{manifest_path}: lists no SHA-256 for {name}; {fix}")
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; {fix}")
        got = _sha256(folder / name)
        if got != sums[name]:
            raise CheckpointError(f"{folder / name}: SHA-256 {got} does not match the manifest's {sums[name]}; "
                                  f"the file is corrupt or was edited; {fix}")
    return manifest


class _TensorStore:
    """The tensors of one checkpoint by key, each tensor object once: safetensors refuses two keys over
    one memory, which tied weights (or views of one buffer) would otherwise give."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def add(self, tensor: torch.Tensor, key: str) -> str:
        t = tensor.detach()
        identity = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and identity in self._keys:
            return self._keys[identity]
        t = t.to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in self._storages:
            t = t.clone()  # another view of memory already saved under another key
        self.tensors[key] = t
        if t.numel():
            self._keys[identity] = key
            self._storages.add(storage)
        return key


def _encode(obj: Any, store: _TensorStore, path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return {_TENSOR: store.add(obj, path or "root")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, store, f"{path}.{k}" if path else k) for k, v in obj.items()}
        # e.g. the optimizer's state, keyed by int parameter ids (load_state_dict needs ints back)
        return {_ITEMS: [[_encode(k, store, f"{path}.key{i}"), _encode(v, store, f"{path}.{k}")]
                         for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):  # random.setstate needs its tuples back
        return {_TUPLE: [_encode(v, store, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, store, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path or 'state'}: cannot store a {type(obj).__name__} in a checkpoint; state_dict "
                    "values must be tensors, numbers, strings, None, or lists/tuples/dicts of them")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

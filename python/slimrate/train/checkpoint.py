"""Checkpoints: tensors in safetensors, everything else in JSON, a manifest with SHA-256 checksums.

Layout (docs/training.md §2): ``<out_dir>/checkpoints/step-00000060/`` holding ``tensors.safetensors`` (every
tensor of the saved state: model, optimizer moments, RNG states, ...), ``state.json`` (the rest, with each tensor
replaced by a reference into the safetensors file) and ``manifest.json`` (format, version, step, and the SHA-256
of exactly those two files).  A checkpoint is written into a hidden temporary folder, the manifest last, and only
then renamed to its final name, so a run killed mid-write leaves either no new checkpoint or a complete one.
Loading verifies everything before using anything: the manifest (its fields and their types), that the folder
holds exactly the files it lists, their checksums, then the files' contents; any failure is a ``CheckpointError``
naming the file and what is wrong.  ``write_manifest`` and ``verify_manifest`` serve any folder of files written
together (a DMB model folder, too).
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimrate.checkpoints import safetensors_header
from slimrate.files import write_text_atomic

CHECKPOINT_FORMAT = "slimrate-checkpoint"
CHECKPOINT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (TENSORS_FILE, STATE_FILE)  # what a checkpoint's manifest lists, no more, no less
DEFAULT_KEEP = 2  # so that a damaged newest checkpoint still leaves one to resume from
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
TEMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20
CHECKPOINT_FIX = "the checkpoint cannot be used (resume falls back to the newest one that verifies)"

# JSON has no tensors, tuples or non-string keys; these markers carry them through state.json.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class CheckpointError(ValueError):
    """A checkpoint (or another folder verified by its manifest, such as a DMB model) is incomplete, corrupt
    or from an unknown format.  reason: the file and what is wrong with it; fix: what the user can do about it;
    the message is both."""

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(f"{reason}; {fix}" if fix else reason)
        self.reason, self.fix = reason, fix


def checkpoint_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """The checkpoint folders (``step-N``) under ``directory`` as (step, path), oldest first; whether each one
    verifies is for ``load_checkpoint`` to say."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint folder with the highest step under ``directory`` (verified or not), or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = DEFAULT_KEEP) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors, numbers, strings) as the checkpoint of
    ``step`` under ``directory``, atomically; then delete any temporary folders an interrupted save left behind
    and all but the newest ``keep`` checkpoints up to ``step`` (newer ones, left by a run that resumed from an
    earlier checkpoint, are replaced when the run reaches their steps).  Returns the checkpoint's folder."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_temp_folders(directory)
    final = checkpoint_dir(directory, step)
    temp = directory / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    temp.mkdir()
    write_state_files(temp, state)
    write_manifest(temp, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CHECKPOINT_FILES, step=step)
    return publish_checkpoint(temp, final, keep)


def remove_temp_folders(directory: Path) -> None:
    """Delete the hidden temporary folders interrupted saves left in ``directory``."""
    for stale in directory.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_state_files(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` into ``folder`` as tensors.safetensors and state.json (tensors replaced by references),
    each flushed to disk."""
    store = _TensorStore()
    encoded = _encode(state, store, "")
    save_file(store.tensors, str(folder / TENSORS_FILE), metadata={"format": CHECKPOINT_FORMAT})
    _fsync_file(folder / TENSORS_FILE)
    _write_synced(folder / STATE_FILE, json.dumps(encoded).encode())


def read_state_files(folder: Path, fix: str = CHECKPOINT_FIX) -> dict[str, Any]:
    """The state ``write_state_files`` wrote into ``folder`` (tensors on the CPU); CheckpointError naming the
    file when either cannot be read or does not hold what it would write.  Checksums are the caller's."""
    tensors = read_tensors(folder / TENSORS_FILE, fix)
    return _decode(read_json(folder / STATE_FILE, fix), tensors, folder / STATE_FILE)


def publish_checkpoint(temp: Path, final: Path, keep: int) -> Path:
    """Rename the complete checkpoint ``temp`` (manifest written) to ``final`` durably, replacing one of the same
    step; then delete all but the newest ``keep`` checkpoints up to its step.  Returns ``final``."""
    directory = final.parent
    step = int(_STEP_DIR.match(final.name).group(1))
    if final.exists():  # this step saved again (after resuming from an earlier checkpoint): the new one wins
        shutil.rmtree(final)
    os.rename(temp, final)
    _fsync_dir(directory)
    for _, old in [found for found in list_checkpoints(directory) if found[0] <= step][:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved in the checkpoint folder ``path``; tensors come back on the CPU.  Verified first
    (``verify_manifest``: exactly tensors.safetensors and state.json, nothing else in the folder, their
    checksums; the manifest's step is the folder's), then read; ``CheckpointError`` naming the file otherwise."""
    path = Path(path)
    manifest = verify_manifest(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CHECKPOINT_FILES, CHECKPOINT_FIX,
                               whole_folder=True)
    check_manifest_step(manifest, path)
    return read_state_files(path)


def check_manifest_step(manifest: dict[str, Any], path: Path, fix: str = CHECKPOINT_FIX) -> None:
    """CheckpointError unless the manifest's ``step`` is an int equal to the step in the folder's name."""
    step, match = manifest.get("step"), _STEP_DIR.match(path.name)
    if type(step) is not int or (match and int(match.group(1)) != step):
        raise CheckpointError(f"{path / MANIFEST_FILE}: step: expected the folder's step "
                              f"({int(match.group(1)) if match else 'an int'}), got {step!r:.80}", fix)


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
                    fix: str, *, whole_folder: bool = False) -> dict[str, Any]:
    """Check ``folder/manifest.json`` (``write_manifest``'s) and the files it covers: its format and version; that
    it lists the SHA-256 of exactly ``files``, the files this format writes (one missing from the list or one
    added to it is refused, so no file of the format goes unchecked); that each is present with that checksum;
    and with ``whole_folder``, that the folder holds nothing else (a training checkpoint's folder is its own; a
    DMB run folder also holds metrics and checkpoints).  Returns the manifest; raises ``CheckpointError`` naming
    the file at fault and what is wrong, with ``fix`` (what the user can do about it)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_FILE}, so its files cannot be verified (a save that was "
                              f"interrupted, or not a {format_name!r} folder)", fix)
    manifest = read_json(path, fix)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(manifest).__name__}", fix)
    got_format, got_version = manifest.get("format"), manifest.get("version")
    if got_format != format_name or type(got_version) is not int or got_version != version:
        raise CheckpointError(f"{path}: expected format {format_name!r} version {version}, got {got_format!r:.80} "
                              f"version {got_version!r:.80}", fix)
    sums = manifest.get("sha256")
    expected = ", ".join(files)
    if not isinstance(sums, dict):
        raise CheckpointError(f'{path}: "sha256": expected an object file name → SHA-256 of {expected}, got '
                              f"{sums!r:.80}", fix)
    for name in files:
        if name not in sums:
            raise CheckpointError(f"{path}: lists no SHA-256 for {name} (a {format_name!r} manifest lists "
                                  f"{expected})", fix)
        if not (isinstance(sums[name], str) and _SHA256_HEX.fullmatch(sums[name])):
            raise CheckpointError(f"{path}: the SHA-256 of {name}: expected 64 lowercase hex digits, got "
                                  f"{sums[name]!r:.80}", fix)
    added = sorted(set(sums) - set(files))
    if added:
        raise CheckpointError(f"{path}: lists {added[0]!r:.80}, which is not a file of a {format_name!r} folder (its "
                              f"manifest lists exactly {expected})", fix)
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing", fix)
    if whole_folder:
        others = sorted(p.name for p in folder.iterdir() if p.name not in (*files, MANIFEST_FILE))
        if others:
            raise CheckpointError(f"{folder / others[0]}: not listed in {MANIFEST_FILE} (a {format_name!r} folder "
                                  f"holds only {expected} and the manifest)", fix)
    for name in files:
        try:
            got = _sha256(folder / name)
        except OSError as e:
            raise _unreadable(folder / name, e, fix) from None
        if got != sums[name]:
            raise CheckpointError(f"{folder / name}: SHA-256 {got} does not match the manifest's {sums[name]}; "
                                  f"the file is corrupt or was edited", fix)
    return manifest


def read_json(path: Path, fix: str) -> Any:
    """The JSON value in the file ``path``; ``CheckpointError`` naming the file when it cannot be read, is empty,
    is not UTF-8 or is not JSON (with ``fix``)."""
    data = _read_bytes(path, fix)
    if not data:
        raise CheckpointError(f"{path}: empty (0 bytes), expected JSON", fix)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})", fix) from None
    except (ValueError, RecursionError) as e:  # RecursionError: a deeply nested forgery
        raise CheckpointError(f"{path}: not valid JSON ({e})", fix) from None


def read_tensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """name → tensor of the safetensors file ``path``, on the CPU; its header is checked before anything is
    allocated; ``CheckpointError`` naming the file when it cannot be read or is not a valid safetensors file."""
    try:
        safetensors_header(path)
        return load_file(str(path))
    except OSError as e:
        raise _unreadable(path, e, fix) from None
    except ValueError as e:  # the header check's message names the file already
        raise CheckpointError(str(e), fix) from None
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})", fix) from None


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


class _Malformed(Exception):
    """A marker of state.json that ``_encode`` would not write."""


def _decode(obj: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    """``_encode``'s inverse; ``CheckpointError`` naming ``path`` (state.json) for a marker it would not write."""
    try:
        return _decode_value(obj, tensors)
    except (_Malformed, RecursionError) as e:
        raise CheckpointError(f"{path}: {e}", CHECKPOINT_FIX) from None


def _decode_value(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode_value(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        key = obj[_TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise _Malformed(f"refers to tensor {key!r:.80}, which {TENSORS_FILE} does not hold")
        return tensors[key]
    if _TUPLE in obj:
        if not isinstance(obj[_TUPLE], list):
            raise _Malformed(f"{_TUPLE}: expected a list, got {obj[_TUPLE]!r:.80}")
        return tuple(_decode_value(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        items = obj[_ITEMS]
        if not (isinstance(items, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in items)):
            raise _Malformed(f"{_ITEMS}: expected a list of [key, value] pairs, got {items!r:.80}")
        decoded = [(_decode_value(k, tensors), _decode_value(v, tensors)) for k, v in items]
        try:
            return dict(decoded)
        except TypeError:  # a key that is not hashable (a list inside a tuple)
            raise _Malformed(f"{_ITEMS}: a key cannot be a dict key: {items!r:.80}") from None
    return {k: _decode_value(v, tensors) for k, v in obj.items()}


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e, fix) from None


def _unreadable(path: Path, error: OSError, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: cannot be read ({error.strerror or error})", fix)


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

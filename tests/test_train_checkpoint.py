"""Training checkpoints (slimrate.train.checkpoint): the round trip, what is kept, and every way a checkpoint
folder can be damaged or forged (the manifest, the files it covers, their contents) refused with a
CheckpointError that names the file and what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from slimrate.train import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from slimrate.train.checkpoint import CHECKPOINT_FILES, MANIFEST_FILE, write_manifest

from helpers import assert_states_equal


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of step 60 holding tensors, nested values and a tuple; returns its folder."""
    return save_checkpoint(tmp_path, 60, {"w": torch.randn(3, 2), "ids": {0: torch.randn(2)}, "t": (1, "x")})


def rewrite_manifest(folder, edit):
    """Apply ``edit`` to the folder's manifest (a dict, edited in place) and write it back as JSON."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    edit(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_checkpoint_round_trips_tied_tensors_int_keys_and_tuples(tmp_path):
    shared = torch.randn(4, 3)
    state = {"a": shared, "tied": shared, "view": shared[1:], "ids": {0: torch.randn(2), 7: [1, 2.5, None]},
             "tuple": (3, (True, "x")), "empty": torch.empty(0), "nan": float("nan")}
    loaded = load_checkpoint(save_checkpoint(tmp_path, 3, state))
    assert_states_equal(loaded, state)


def test_the_newest_two_are_kept_by_default_and_interrupted_saves_cleaned(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"w": torch.randn(3)})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    save_checkpoint(tmp_path, 40, {"w": torch.randn(3)}, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40]
    (tmp_path / ".tmp-step-00000050-123").mkdir()  # a save interrupted before its rename
    (tmp_path / "step-00000090").mkdir()  # newer than the run's step: left by a run that resumed from before it
    assert latest_checkpoint(tmp_path).name == "step-00000090"  # listed; load_checkpoint refuses it
    save_checkpoint(tmp_path, 50, {"w": torch.randn(3)})
    assert not (tmp_path / ".tmp-step-00000050-123").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 50, 90]  # only steps <= 50 count against keep


def test_save_rejects_a_keep_below_one(tmp_path):
    with pytest.raises(ValueError, match="keep: expected an int >= 1, got 0"):
        save_checkpoint(tmp_path, 1, {}, keep=0)


def _json(value):
    return json.dumps(value).encode()


def _without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


# Each: how the manifest is damaged (a function of the written manifest, returning the new bytes) → the message.
MANIFEST_DAMAGES = {
    "empty": (lambda m: b"", r"manifest\.json: empty \(0 bytes\)"),
    "truncated": (lambda m: _json(m)[:len(_json(m)) // 2], r"manifest\.json: not valid JSON"),
    "not-utf8": (lambda m: b'{"format": "\xff"}', r"manifest\.json: not UTF-8 text"),
    "deeply-nested": (lambda m: b"[" * 100_000, r"manifest\.json: not valid JSON"),
    "list": (lambda m: _json([m]), r"manifest\.json: expected a JSON object, got list"),
    "format-type": (lambda m: _json({**m, "format": 7}), r"expected format 'slimrate-checkpoint' version 1, got 7"),
    "version-string": (lambda m: _json({**m, "version": "1"}), r"version 1, got .* version '1'"),
    "version-bool": (lambda m: _json({**m, "version": True}), r"version 1, got .* version True"),
    "version-other": (lambda m: _json({**m, "version": 2}), r"version 1, got .* version 2"),
    "no-sha256": (lambda m: _json(_without(m, "sha256")),
                  r'"sha256": expected an object file name → SHA-256 of tensors\.safetensors, state\.json, got None'),
    "sha256-list": (lambda m: _json({**m, "sha256": list(m["sha256"].values())}), r'"sha256": expected an object'),
    "sha256-empty": (lambda m: _json({**m, "sha256": {}}), r"lists no SHA-256 for tensors\.safetensors"),
    "sha256-one-missing": (lambda m: _json({**m, "sha256": _without(m["sha256"], "state.json")}),
                           r"lists no SHA-256 for state\.json"),
    "sha256-number": (lambda m: _json({**m, "sha256": {**m["sha256"], "state.json": 5}}),
                      r"the SHA-256 of state\.json: expected 64 lowercase hex digits, got 5"),
    "sha256-short": (lambda m: _json({**m, "sha256": {**m["sha256"], "state.json": "ab"}}),
                     r"the SHA-256 of state\.json: expected 64 lowercase hex digits, got 'ab'"),
    "sha256-extra-file": (lambda m: _json({**m, "sha256": {**m["sha256"], "notes.txt": "0" * 64}}),
                          r"lists 'notes\.txt', which is not a file of a 'slimrate-checkpoint' folder"),
    "no-step": (lambda m: _json(_without(m, "step")),
                r"step: expected the folder's step \(60\), got None"),
    "step-string": (lambda m: _json({**m, "step": "60"}), r"step: expected the folder's step \(60\), got '60'"),
    "step-other": (lambda m: _json({**m, "step": 61}), r"step: expected the folder's step \(60\), got 61"),
}


@pytest.mark.parametrize("how", MANIFEST_DAMAGES)
def test_a_damaged_manifest_is_refused_naming_it(saved, how):
    damage, message = MANIFEST_DAMAGES[how]
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    (saved / MANIFEST_FILE).write_bytes(damage(manifest))
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(saved)
    assert str(saved) in str(error.value)


def test_an_edited_state_is_refused_when_the_manifest_lists_no_checksums(saved):
    state = json.loads((saved / "state.json").read_text())
    state["t"]["__tuple__"][0] = 2
    (saved / "state.json").write_text(json.dumps(state))
    rewrite_manifest(saved, lambda m: m.update(sha256={}))
    with pytest.raises(CheckpointError, match=r"lists no SHA-256 for tensors\.safetensors"):
        load_checkpoint(saved)


@pytest.mark.parametrize("victim", CHECKPOINT_FILES)
def test_a_changed_file_fails_its_checksum(saved, victim):
    data = bytearray((saved / victim).read_bytes())
    data[int(torch.randint(len(data), ()))] ^= 0x01
    (saved / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{saved / victim}: SHA-256 [0-9a-f]+ does not match the manifest"):
        load_checkpoint(saved)


def test_a_missing_file_and_an_unlisted_file_are_refused(saved, tmp_path):
    copy = tmp_path / "copy" / saved.name
    shutil.copytree(saved, copy)
    (copy / "notes.txt").write_text("added by hand")
    with pytest.raises(CheckpointError, match=rf"{copy / 'notes.txt'}: not listed in manifest\.json"):
        load_checkpoint(copy)
    (saved / "state.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{saved / 'state.json'}: missing"):
        load_checkpoint(saved)
    (saved / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{saved}: no manifest\.json"):
        load_checkpoint(saved)


def _write_state(folder, text):
    (folder / "state.json").write_bytes(text if isinstance(text, bytes) else text.encode())


def _write_tensors(folder, header):
    data = json.dumps(header).encode()
    (folder / "tensors.safetensors").write_bytes(len(data).to_bytes(8, "little") + data + bytes(8))


# Forged contents under a manifest whose checksums match them: → the file and the message.
CONTENT_FORGERIES = {
    "state-truncated": (lambda f: _write_state(f, (f / "state.json").read_bytes()[:-3]),
                        "state.json", "not valid JSON"),
    "state-not-utf8": (lambda f: _write_state(f, b'{"w": "\xfe"}'), "state.json", "not UTF-8 text"),
    "state-empty": (lambda f: _write_state(f, b""), "state.json", r"empty \(0 bytes\)"),
    "state-dangling-tensor": (lambda f: _write_state(f, '{"w": {"__tensor__": "ghost"}}'),
                              "state.json", "refers to tensor 'ghost', which tensors.safetensors does not hold"),
    "state-bad-tuple": (lambda f: _write_state(f, '{"t": {"__tuple__": 3}}'), "state.json",
                        "__tuple__: expected a list, got 3"),
    "state-bad-items": (lambda f: _write_state(f, '{"d": {"__items__": [[1]]}}'), "state.json",
                        r"__items__: expected a list of \[key, value\] pairs"),
    "state-unhashable-key": (lambda f: _write_state(f, '{"d": {"__items__": [[[1], 2]]}}'), "state.json",
                             "__items__: a key cannot be a dict key"),
    "tensors-garbage": (lambda f: (f / "tensors.safetensors").write_bytes(b"not safetensors at all"),
                        "tensors.safetensors", "not a valid safetensors file"),
    "tensors-dtype-list": (lambda f: _write_tensors(f, {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}),
                           "tensors.safetensors", "not a valid safetensors file"),
    "tensors-huge-zero-shape": (lambda f: _write_tensors(f, {"w": {"dtype": "F32", "shape": [2**63, 0],
                                                                   "data_offsets": [0, 0]}}),
                                "tensors.safetensors", "not a valid safetensors file"),
}


@pytest.mark.parametrize("how", CONTENT_FORGERIES)
def test_forged_contents_with_matching_checksums_are_refused_naming_the_file(saved, how):
    forge, victim, message = CONTENT_FORGERIES[how]
    forge(saved)
    write_manifest(saved, "slimrate-checkpoint", 1, CHECKPOINT_FILES, step=60)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(saved)
    assert str(saved / victim) in str(error.value)


def test_a_tensors_file_safetensors_itself_refuses_is_a_checkpoint_error(saved, monkeypatch):
    """A file the header check passes but safetensors refuses (here simulated) is still a CheckpointError."""
    save_file({"w": torch.randn(2)}, saved / "tensors.safetensors")
    write_manifest(saved, "slimrate-checkpoint", 1, CHECKPOINT_FILES, step=60)
    def refuse(path):
        raise SafetensorError("simulated refusal")

    monkeypatch.setattr("slimrate.train.checkpoint.load_file", refuse)
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors: not a valid safetensors file"):
        load_checkpoint(saved)

"""Writing .slim files as a stream (docs/slim-format.md): each tensor is encoded and its payload written as it
is added, the index and trailer at the end, so memory is bounded by one tensor and its payload, not the model.

The file is written to a temporary file beside the target and renamed onto it only when everything is
written (slimrate.files.atomic_file): an error or an interruption leaves no partial file and any existing
target untouched.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from slimrate.backslash.slim_coding import CODERS, QUANTIZABLE_DTYPES, dtype_name, encode_payload, raw_payload
from slimrate.backslash.slim_layout import index_bytes, start_bytes
from slimrate.files import atomic_file


def _check_step(what: str, step: object) -> float:
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (math.isfinite(step) and step > 0):
        raise ValueError(f"{what}: expected a finite number > 0, got {step!r}")
    return float(step)


def _check_coder(coder: object) -> str:
    if coder not in CODERS:
        raise ValueError(f"coder: expected one of {CODERS}, got {coder!r}")
    return coder


class SlimWriter:
    """A .slim file written one tensor at a time; use it as a context manager.

    path: the target file; metadata: str → str pairs stored in the index (SlimFile.metadata());
    chunk_numel: symbols per independently coded chunk of an entropy-coded tensor (None:
    ops.DEFAULT_CHUNK_NUMEL, 2^20).
    Inside ``with``, the file is a temporary file beside ``path``; a clean exit writes the index and the
    trailer, fsyncs and renames it onto ``path``; an exception removes it.
    """

    def __init__(self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
                 chunk_numel: int | None = None):
        if metadata is not None and not (isinstance(metadata, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise TypeError(f"metadata: expected a mapping of str to str or None, got {metadata!r:.80}")
        if chunk_numel is not None and (isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int)
                                        or chunk_numel < 1):
            raise ValueError(f"chunk_numel: expected an int >= 1 or None (the default chunk), got {chunk_numel!r}")
        self.path = Path(path)
        self._metadata = dict(metadata or {})
        self._chunk_numel = chunk_numel
        self._entries: list[dict] = []
        self._names: set[str] = set()
        self._atomic = self._file = None
        self._offset = 0

    def __enter__(self) -> SlimWriter:
        if self._atomic is not None:
            raise ValueError(f"SlimWriter({self.path}): already used; make one writer per file")
        self._atomic = atomic_file(self.path)
        self._file = self._atomic.__enter__()
        self._write(start_bytes())
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._file is None:  # closed already by a failed write
            return False
        if exc_type is None:
            try:
                self._write(index_bytes(self._entries, self._metadata, self._offset))
            except BaseException as error:
                self._close(error)
                raise
        self._file = None
        return self._atomic.__exit__(exc_type, exc, tb)

    def add(self, name: str, tensor: torch.Tensor, *, step: float | None, coder: str = "eg") -> None:
        """Encode ``tensor`` and append its payload now.

        step: Δ > 0 to quantize (float dtypes only) and entropy-code with ``coder`` ("eg", "eg-signed",
        "rans"); None to store the tensor's bytes losslessly ("raw"). Nothing is written when a check fails:
        ValueError naming the tensor for a step above the dtype's largest value, a value that is not finite or
        whose q·Δ would not be finite in the tensor's dtype.
        """
        if self._file is None:
            raise ValueError("SlimWriter.add: the writer is not open; add tensors inside `with SlimWriter(path) as w:`")
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise TypeError(f"tensor {name!r}: expected a str name and a dense tensor, "
                            f"got {type(name).__name__} → {type(tensor).__name__}")
        if name in self._names:
            raise ValueError(f"tensor {name!r}: added twice; names in a .slim file are unique")
        entry = {"name": name, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "coder": "raw",
                 "step": None}
        if step is None:
            payload = raw_payload(tensor)
        else:
            step = _check_step(f"step for {name!r}", step)
            if entry["dtype"] not in QUANTIZABLE_DTYPES:
                raise ValueError(f"step for {name!r}: {tensor.dtype} is not a float dtype; only floats are quantized, "
                                 f"pass step=None to store it losslessly")
            if step > torch.finfo(tensor.dtype).max:  # the reader refuses it: every q ≠ 0 would decode to ±inf
                raise ValueError(f"step for {name!r}: {step:g} is above {tensor.dtype}'s largest value "
                                 f"{torch.finfo(tensor.dtype).max:g}; use a smaller step or store it losslessly")
            try:
                # the op refuses a value whose q·Δ is not finite in the tensor's dtype, naming its flat index
                payload, fields = encode_payload(tensor, step, _check_coder(coder), self._chunk_numel)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            entry.update(coder=coder, step=step, **fields)
        entry.update(offset=self._offset, nbytes=payload.nbytes, crc32=zlib.crc32(payload))
        self._write(payload)
        self._entries.append(entry)
        self._names.add(name)

    def _write(self, data: bytes | memoryview) -> None:
        """Append to the temporary file; a failed write removes it (its content is unknown) and closes the writer."""
        try:
            self._file.write(data)
        except BaseException as error:
            self._close(error)
            raise
        self._offset += memoryview(data).nbytes

    def _close(self, error: BaseException) -> None:
        self._file = None
        self._atomic.__exit__(type(error), error, error.__traceback__)


def _items(source) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a mapping or an iterable of pairs, one at a time."""
    if isinstance(source, Mapping):
        yield from source.items()
        return
    if isinstance(source, (str, bytes, torch.Tensor)) or not isinstance(source, Iterable):
        raise TypeError(f"model_or_state_dict: expected an nn.Module, a dict of tensors or an iterable of "
                        f"(name, tensor) pairs, got {type(source).__name__}")
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"model_or_state_dict: expected (name, tensor) pairs, got {type(item).__name__}")
        yield item


def _step_rule(step, max_error):
    """name, tensor → Δ or None (lossless), from save_slim's step= / max_error=; numbers checked now."""
    if (step is None) == (max_error is None):
        raise ValueError("pass exactly one of step= (Δ, or a dict name → Δ) and max_error= (Δ = 2·max_error)")
    if max_error is not None:
        step = 2 * _check_step("max_error", max_error)
    if isinstance(step, Mapping):
        steps = {name: None if delta is None else _check_step(f"step[{name!r}]", delta) for name, delta in step.items()}
        return lambda name, t: steps.get(name)
    delta = _check_step("step", step)
    return lambda name, t: (delta if isinstance(t, torch.Tensor) and t.dim() >= 2
                            and dtype_name(t.dtype) in QUANTIZABLE_DTYPES else None)


def _check_step_names(step, names: set[str]) -> None:
    if isinstance(step, Mapping):
        unknown = sorted(set(step) - names)
        if unknown:
            raise ValueError(f"step: names not in the state dict: {unknown[:5]}")


def save_slim(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
              path: str | os.PathLike, step: float | Mapping[str, float | None] | None = None, *,
              max_error: float | None = None, coder: str = "eg", metadata: Mapping[str, str] | None = None) -> Path:
    """Write a model's state dict as a .slim file, atomically and as a stream; returns the path.

    model_or_state_dict: an nn.Module, a dict name → tensor, or an iterable of (name, tensor) pairs, consumed
    one at a time (e.g. a generator reading a checkpoint), so memory holds one tensor, not the model.
    step: one Δ for every float tensor with ≥ 2 dims (others, e.g. biases, norms, int buffers, are stored
    losslessly), or a dict name → Δ: named float tensors are quantized (any rank), the rest stored losslessly.
    max_error: instead of step, Δ = 2·max_error, so |θ − θ̂| ≤ max_error (plus half an ulp of θ's dtype); a value
    whose θ̂ would round past its dtype's largest value (float16 65504 with max_error 32) raises ValueError
    naming the tensor, before the file is written.
    coder: "eg" (frequency-sorted table + EG0 of ranks, the paper's Algorithm 2), "eg-signed" (signed EG0 of q,
    no table) or "rans". q = round(θ/Δ) and θ̂ = q·Δ are computed in float64; θ̂ is rounded once to θ's dtype.
    metadata: str → str pairs stored in the file (SlimFile.metadata()).
    """
    _check_coder(coder)
    step_for = _step_rule(step, max_error)
    if isinstance(model_or_state_dict, nn.Module):
        model_or_state_dict = model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):  # names known now: refuse a typo before encoding anything
        _check_step_names(step, set(model_or_state_dict))
    seen = set()
    with SlimWriter(path, metadata=metadata) as writer:
        for name, tensor in _items(model_or_state_dict):
            writer.add(name, tensor, step=step_for(name, tensor), coder=coder)
            seen.add(name)
        _check_step_names(step, seen)
    return Path(path)

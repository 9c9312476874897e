"""The .slim model file: an entropy-coded state dict, no pickle anywhere (docs/slim-format.md).

Layout (all integers little-endian):

    offset 0   b"SLIM"                 magic
           4   uint32 version          FORMAT_VERSION
           8   uint64 header_nbytes    H
          16   uint32 header_crc32     zlib.crc32 of bytes [0, 16) + the header JSON
          20   header JSON (UTF-8, H bytes): {"tensors": [entry, ...]}
        20+H   payloads, one per tensor, back to back in header order, up to the end of the file

    entry = {"name": str, "shape": [int], "dtype": "float32" | ..., "coder": "raw" | "eg" | "eg-signed" | "rans",
             "step": Δ (float) or null for "raw", "offset": absolute file offset, "nbytes": payload bytes,
             "crc32": zlib.crc32 of the payload, and for "eg": "table_count", "table_nbytes"}

Coders: slim_coding.py. Checksums are CRC32 (zlib): fast, and it detects every single-byte change.
Reading checks the magic, version, header checksum, every field's type and range, that the payloads tile the
file exactly, and each payload's checksum before decoding it, so a truncated or corrupt file raises
SlimFormatError (a ValueError) before any size taken from the file is allocated.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from slimrate.backslash.slim_coding import (
    CODERS,
    QUANTIZABLE_DTYPES,
    RAW_DTYPES,
    SlimFormatError,
    decode_symbols,
    dequantize_tensor,
    dtype_name,
    encode_symbols,
    quantize_tensor,
    raw_to_tensor,
    tensor_to_raw,
)
from slimrate.files import write_bytes_atomic

MAGIC = b"SLIM"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<4sIQI")  # magic, version, header_nbytes, header_crc32
CHECKED_PREFIX = 16  # magic, version, header_nbytes: covered by header_crc32
MAX_DIMS = 64
MAX_NUMEL = 2**48  # far above any real tensor; keeps a forged shape from reaching an allocation
ENTRY_KEYS = {"name", "shape", "dtype", "coder", "step", "offset", "nbytes", "crc32"}
EG_KEYS = {"table_count", "table_nbytes"}

__all__ = ["FORMAT_VERSION", "SlimFormatError", "load_slim", "save_slim", "slim_report"]


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    if not isinstance(state, Mapping):
        raise TypeError(f"model_or_state_dict: expected an nn.Module or a dict of tensors, got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise TypeError(f"state dict entry {name!r}: expected a str name and a dense tensor, "
                            f"got {type(name).__name__} → {type(value).__name__}")
    return dict(state)


def _check_step(what: str, step: object) -> float:
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (math.isfinite(step) and step > 0):
        raise ValueError(f"{what}: expected a finite number > 0, got {step!r}")
    return float(step)


def _steps(state: dict[str, torch.Tensor], step, max_error) -> dict[str, float | None]:
    """name → Δ, or None for lossless storage."""
    if (step is None) == (max_error is None):
        raise ValueError("pass exactly one of step= (Δ, or a dict name → Δ) and max_error= (Δ = 2·max_error)")
    if max_error is not None:
        step = 2 * _check_step("max_error", max_error)
    if isinstance(step, Mapping):
        unknown = sorted(set(step) - set(state))
        if unknown:
            raise ValueError(f"step: names not in the state dict: {unknown[:5]}")
        steps = {name: None if step.get(name) is None else _check_step(f"step[{name!r}]", step[name])
                 for name in state}
        for name, delta in steps.items():
            if delta is not None and dtype_name(state[name].dtype) not in QUANTIZABLE_DTYPES:
                raise ValueError(f"step[{name!r}]: {state[name].dtype} is not a float dtype; only floats are "
                                 f"quantized, leave it out to store it losslessly")
        return steps
    delta = _check_step("step", step)
    return {name: delta if dtype_name(t.dtype) in QUANTIZABLE_DTYPES and t.dim() >= 2 else None
            for name, t in state.items()}


def save_slim(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
              step: float | Mapping[str, float | None] | None = None, *, max_error: float | None = None,
              coder: str = "eg") -> Path:
    """Write a model's state dict as a .slim file, atomically; returns the path.

    step: one Δ for every float tensor with ≥ 2 dims (others, e.g. biases, norms, int buffers, are stored
    losslessly), or a dict name → Δ: named float tensors are quantized (any rank), the rest stored losslessly.
    max_error: instead of step, Δ = 2·max_error, so |θ − θ̂| ≤ max_error (plus half an ulp of θ's dtype).
    coder: "eg" (frequency-sorted table + EG0 of ranks, the paper's Algorithm 2), "eg-signed" (signed EG0 of q,
    no table) or "rans". q = round(θ/Δ) and θ̂ = q·Δ are computed in float64; θ̂ is rounded once to θ's dtype.
    """
    if coder not in CODERS:
        raise ValueError(f"coder: expected one of {CODERS}, got {coder!r}")
    state = _state_dict(model_or_state_dict)
    steps = _steps(state, step, max_error)
    entries, payloads = [], []
    for name, t in state.items():
        entry = {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "coder": "raw", "step": None}
        if steps[name] is None:
            payload = tensor_to_raw(t)
        else:
            entry.update(coder=coder, step=steps[name])
            payload, extra = encode_symbols(quantize_tensor(t, steps[name], name), coder)
            entry.update(extra)
        entry.update(nbytes=len(payload), crc32=zlib.crc32(payload))
        entries.append(entry)
        payloads.append(payload)
    return write_bytes_atomic(path, _layout(entries, payloads))


def _layout(entries: list[dict], payloads: list[bytes]) -> bytes:
    """Fill in the absolute offsets. They depend on the header's length, which depends on their digits, so
    iterate until the length is stable (at most a few rounds: each round can only add digits)."""
    header_nbytes = 0
    while True:
        offset = PREFIX.size + header_nbytes
        for entry in entries:
            entry["offset"] = offset
            offset += entry["nbytes"]
        header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
        if len(header) == header_nbytes:
            break
        header_nbytes = len(header)
    start = struct.pack("<4sIQ", MAGIC, FORMAT_VERSION, header_nbytes)
    return start + struct.pack("<I", zlib.crc32(start + header)) + header + b"".join(payloads)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(entry: object, index: int) -> tuple[dict, int]:
    """Every field's type and range; returns (entry, numel)."""
    where = f"header tensor #{index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise SlimFormatError(f"{where}: expected an object with a str name")
    where = f"header tensor {entry['name']!r}"
    coder = entry.get("coder")
    if coder not in ("raw", *CODERS):
        raise SlimFormatError(f"{where}: unknown coder {coder!r}")
    if set(entry) != ENTRY_KEYS | (EG_KEYS if coder == "eg" else set()):
        raise SlimFormatError(f"{where}: unexpected fields {sorted(entry)}")
    shape = entry["shape"]
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape)):
        raise SlimFormatError(f"{where}: bad shape {shape!r}")
    if entry["dtype"] not in RAW_DTYPES:
        raise SlimFormatError(f"{where}: unknown dtype {entry['dtype']!r}")
    if not all(_is_int(entry[key]) and entry[key] >= 0 for key in ("offset", "nbytes", "crc32", *EG_KEYS & set(entry))):
        raise SlimFormatError(f"{where}: offset, sizes and checksum must be integers >= 0")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise SlimFormatError(f"{where}: shape {shape} has more than {MAX_NUMEL} elements")
    step = entry["step"]
    if coder == "raw":
        if step is not None or entry["nbytes"] != numel * RAW_DTYPES[entry["dtype"]].itemsize:
            raise SlimFormatError(f"{where}: raw payload of {entry['nbytes']} bytes does not match "
                                  f"shape {shape} × {entry['dtype']}")
    elif not (entry["dtype"] in QUANTIZABLE_DTYPES and isinstance(step, float) and math.isfinite(step) and step > 0):
        raise SlimFormatError(f"{where}: quantized tensors need a float dtype and a step > 0, got "
                              f"{entry['dtype']}, {step!r}")
    return entry, numel


def _read_header(data: bytes) -> list[tuple[dict, int]]:
    if len(data) < PREFIX.size:
        raise SlimFormatError(f"not a .slim file: {len(data)} bytes, shorter than the {PREFIX.size}-byte prefix")
    magic, version, header_nbytes, header_crc = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SlimFormatError(f"not a .slim file: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise SlimFormatError(f"unsupported .slim version {version}; this slimrate reads version {FORMAT_VERSION}")
    if header_nbytes > len(data) - PREFIX.size:
        raise SlimFormatError(f"truncated: header of {header_nbytes} bytes, file has {len(data)} bytes")
    header = bytes(data[PREFIX.size:PREFIX.size + header_nbytes])
    if zlib.crc32(bytes(data[:CHECKED_PREFIX]) + header) != header_crc:
        raise SlimFormatError("header checksum mismatch: the file is corrupt")
    try:
        tensors = json.loads(header.decode())["tensors"]
    except (ValueError, TypeError, KeyError, RecursionError) as e:  # RecursionError: a forged, deeply nested header
        raise SlimFormatError(f"malformed header: {e}") from None
    if not isinstance(tensors, list):
        raise SlimFormatError("malformed header: 'tensors' is not a list")
    entries = [_check_entry(entry, i) for i, entry in enumerate(tensors)]
    offset = PREFIX.size + header_nbytes
    names = set()
    for entry, _ in entries:
        if entry["offset"] != offset or entry["name"] in names:
            raise SlimFormatError(f"header tensor {entry['name']!r}: offset {entry['offset']}, expected {offset} "
                                  f"(payloads are back to back), or a duplicate name")
        names.add(entry["name"])
        offset += entry["nbytes"]
    if offset != len(data):
        raise SlimFormatError(f"payloads end at byte {offset}, the file has {len(data)} bytes: truncated or padded")
    return entries


def _read(path: str | os.PathLike) -> tuple[memoryview, list[tuple[dict, int]]]:
    data = memoryview(Path(path).read_bytes())  # slices of a memoryview are views, not copies
    return data, _read_header(data)


def load_slim(path: str | os.PathLike, map_location: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read a .slim file into a state dict (name → tensor in its original dtype and shape).

    map_location: device for the tensors, as in torch.load (a str or torch.device); None = CPU.
    Raises SlimFormatError (a ValueError) on a truncated or corrupt file."""
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location: expected a str or torch.device, got {type(map_location).__name__}")
    data, entries = _read(path)
    state = {}
    for entry, numel in entries:
        payload = data[entry["offset"]:entry["offset"] + entry["nbytes"]]
        if zlib.crc32(payload) != entry["crc32"]:
            raise SlimFormatError(f"tensor {entry['name']!r}: payload checksum mismatch, the file is corrupt")
        if entry["coder"] == "raw":
            t = raw_to_tensor(payload, entry["shape"], entry["dtype"])
        else:
            t = dequantize_tensor(decode_symbols(payload, entry, numel), entry["step"], entry["shape"], entry["dtype"])
        state[entry["name"]] = t if map_location is None else t.to(map_location)
    return state


def slim_report(path: str | os.PathLike) -> list[dict]:
    """Per-tensor sizes of a .slim file, from its (validated) header; payloads are not decoded.

    Each dict: name, shape, dtype, coder, step, bytes (payload, incl. the "eg" table), bits_per_param,
    ratio (fp32 storage bytes / payload bytes; inf for an empty payload)."""
    _, entries = _read(path)
    return [{"name": e["name"], "shape": tuple(e["shape"]), "dtype": e["dtype"], "coder": e["coder"],
             "step": e["step"], "bytes": e["nbytes"], "bits_per_param": 8 * e["nbytes"] / numel if numel else 0.0,
             "ratio": 4 * numel / e["nbytes"] if e["nbytes"] else math.inf} for e, numel in entries]

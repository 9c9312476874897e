"""Running and judging one fuzz case, and the worker process that runs batches of them under a memory cap.

Outcomes: "loaded" and "refused" (a documented exception) pass; the others are failures: "crash" (the worker
died), "hang" (over the time limit), "blowup" (peak RSS grew past the bound below, or an allocation failed),
"error" (an undocumented exception type), "corruption" (a load of a corrupt input succeeded: a mutated file gave
other tensors than its seed file, or the format requires the input to be refused), "wrong" (a result that is not
what the index or the call declares: names, shape, dtype, non-finite decoded values, other symbols).
"""

from __future__ import annotations

import inspect
import json
import math
import resource
import time
from pathlib import Path

import torch
from fuzz_slim_cases import SLIM_FAMILIES, Case, make_case
from fuzz_slim_files import read_image, seed_files

from slimrate import load_slim, ops
from slimrate.backslash import SlimFormatError

# The exception types each family may raise: the .slim reader's own error type; the coder ops' ValueError checks,
# and their TypeError argument checks where the case passes an argument of the wrong type.
DOCUMENTED = {**{family: (SlimFormatError,) for family in SLIM_FAMILIES}, "stream": (ValueError,)}
TYPE_EDIT_DOCUMENTED = (ValueError, TypeError)
FAILURES = ("crash", "hang", "blowup", "error", "corruption", "wrong")
OVERHEAD = 64 << 20  # RSS a case may add beyond its decoded data: the interpreter, torch's allocator, mmap pages
# Decoding holds the output, a chunk of int32 symbols and the "eg" table (≤ one int32 per element): for a 2-byte
# dtype, at most 5 × the output.
WORK_FACTOR = 5
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1}
LOADER_HAS_MAX_BYTES = "max_bytes" in inspect.signature(load_slim).parameters


def _status(field: str) -> int:
    """A /proc/self/status size (VmRSS, VmHWM, VmSize) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS (Linux ≥ 4.0, proc(5))
        f.write("5")


def declared_bytes(case: Case) -> int:
    """The decoded size the input declares: Σ numel × itemsize over the index (0 if it cannot be read), or the
    output of the op call."""
    try:
        if case.family == "stream":
            call = json.loads(case.data)
            if call["op"] == "slim_decode":
                return call["args"][2] * ITEMSIZE[call["args"][6]["dtype"]]
            return call["args"][1] * 4
        return sum(math.prod(e["shape"]) * ITEMSIZE[e["dtype"]] for e in read_image(case.data).entries)
    except Exception:
        return 0


def _arg(value):
    """A stream call's JSON argument as the op takes it: tensors and dtypes rebuilt, the rest as is."""
    if isinstance(value, dict) and "hex" in value:
        return torch.tensor(list(bytes.fromhex(value["hex"])), dtype=torch.uint8)
    if isinstance(value, dict) and "list" in value:
        return torch.tensor(value["list"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict) and "dtype" in value:
        return getattr(torch, value["dtype"])
    return value


def _check_stream(case: Case, call: dict, out) -> tuple[str, str]:
    count, dtype = (call["args"][2], _arg(call["args"][6])) if call["op"] == "slim_decode" else \
        (call["args"][1], torch.int32)
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (count,) and out.dtype == dtype):
        return "wrong", f"returned {getattr(out, 'shape', out)} {getattr(out, 'dtype', '')}, not ({count},) {dtype}"
    if case.expect is not None and out.tolist() != case.expect:
        return "wrong", "an unforged stream decoded to other symbols"
    if dtype.is_floating_point and not bool(out.isfinite().all()):
        return "wrong", f"decoded {out[~out.isfinite()][0].item()}: q·step overflows {dtype}"
    return ("corruption", "accepted a forged count, frequency or stream length") if case.must_refuse else ("loaded", "")


def _check_load(case: Case, state: dict, seed_tensors: dict, max_bytes: int) -> tuple[str, str]:
    if case.family == "bytes":
        for name, t in state.items():
            want = seed_tensors.get(name)
            if want is None or t.dtype != want.dtype or t.shape != want.shape or not torch.equal(
                    t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
                return "corruption", f"tensor {name!r} differs from the seed file's"
        return ("loaded", "") if state.keys() == seed_tensors.keys() else ("corruption", "other tensor names")
    try:
        entries = read_image(case.data).entries
        declared = {e["name"]: e for e in entries}
    except Exception:
        return "wrong", "loaded, but its index does not parse"
    if len(state) != len(entries):
        return "wrong", f"{len(state)} tensors loaded, the index lists {len(entries)}"
    if LOADER_HAS_MAX_BYTES and sum(t.nbytes for t in state.values()) > max_bytes:
        return "wrong", f"loaded {sum(t.nbytes for t in state.values())} bytes with max_bytes={max_bytes}"
    for name, t in state.items():
        e = declared.get(name, {})
        if list(t.shape) != e.get("shape") or str(t.dtype) != f"torch.{e.get('dtype')}":
            return "wrong", f"tensor {name!r}: {list(t.shape)} {t.dtype}, declared {e.get('shape')} {e.get('dtype')}"
        if e.get("coder") != "raw" and t.is_floating_point() and not bool(t.isfinite().all()):
            return "wrong", f"tensor {name!r} decoded to {t[~t.isfinite()][0].item()}: q·step overflows {t.dtype}"
    return ("corruption", "accepted trailing bytes or a symbol count other than the shape's") if case.must_refuse \
        else ("loaded", "")


def run_case(case: Case, folder: Path, max_bytes: int, seed_tensors: dict[str, dict]) -> tuple[str, str, str]:
    """(outcome, message, exception type name or "") of one case; memory is judged by the caller."""
    try:
        if case.family == "stream":
            call = json.loads(case.data)
            return *_check_stream(case, call, getattr(ops, call["op"])(*map(_arg, call["args"]))), ""
        path = folder / "case.slim"
        path.write_bytes(case.data)
        state = load_slim(path, **({"max_bytes": max_bytes} if LOADER_HAS_MAX_BYTES else {}))
        return *_check_load(case, state, seed_tensors.get(case.origin, {}), max_bytes), ""
    except Exception as e:
        documented = TYPE_EDIT_DOCUMENTED if case.type_edit else DOCUMENTED[case.family]
        outcome = "blowup" if isinstance(e, MemoryError) or "allocate" in str(e) else \
            "refused" if isinstance(e, documented) else "error"
        return outcome, str(e)[:300], type(e).__name__


def measured_case(case: Case, folder: Path, max_bytes: int, seed_tensors: dict) -> dict:
    """run_case with its time and peak RSS growth; "blowup" when the growth passes OVERHEAD + WORK_FACTOR × the
    declared decoded size (at most max_bytes: a loader given max_bytes must refuse more before allocating)."""
    rss = _status("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    outcome, message, exception = run_case(case, folder, max_bytes, seed_tensors)
    seconds, growth = time.perf_counter() - start, _status("VmHWM") - rss
    if growth > OVERHEAD and outcome in ("loaded", "refused", "error"):
        bound = OVERHEAD + WORK_FACTOR * min(declared_bytes(case), max_bytes)
        if growth > bound:
            outcome, message = "blowup", f"peak RSS grew by {growth >> 20} MiB, bound {bound >> 20} MiB. {message}"
    return {"family": case.family, "index": case.index, "outcome": outcome, "exception": exception,
            "message": message, "growth": growth, "seconds": seconds}


def load_seed_tensors(files: dict[str, bytes], folder: Path) -> dict[str, dict]:
    tensors = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        tensors[name] = load_slim(folder / name)
    return tensors


def worker_main(conn, seed: int, max_bytes: int, cap_bytes: int, folder: str) -> None:
    """A worker: builds the seed files, runs a few cases to warm up, caps its address space at its size now +
    cap_bytes (RLIMIT_AS), says "ready", then runs each batch [(family, index), ...] it receives, sending one
    result per case, until it receives None."""
    torch.set_num_threads(1)  # one core per worker: the parent runs one worker per core
    folder = Path(folder)
    files = seed_files()
    seed_tensors = load_seed_tensors(files, folder)
    for family in ("bytes", "header", "payload", "stream"):
        measured_case(make_case(family, seed, 0, files), folder, max_bytes, seed_tensors)
    limit = _status("VmSize") + cap_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while (batch := conn.recv()) is not None:
        for family, index in batch:
            conn.send(measured_case(make_case(family, seed, index, files), folder, max_bytes, seed_tensors))

"""Test helpers: readable ids, the flash-attention error rule, backend availability, .slim files read and forged
by hand, hand-made rANS buffers, bit-exact comparison of nested states (checkpoints, state dicts), training runs in
subprocesses (started, killed, finished), the environment of a child Python."""

import importlib.util
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import slimrate
from slimrate.ops import extension_available
from slimrate.sparse import SparseMatrix
from slimrate.train import list_checkpoints

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """‖out − ref64‖ / ‖ref64‖ in float64."""
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def assert_close_flash(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                       ulps: int = 4, what: str = "output") -> None:
    """flash-attention's rule (STYLE.md): err(kernel) ≤ 2·err(reference run in the same dtype) + a few ulps."""
    err, err_ref = rel_err(out, ref64), rel_err(ref_same, ref64)
    bound = 2 * err_ref + ulps * torch.finfo(dtype).eps
    if err > bound:
        diff = (out.double() - ref64).abs().flatten()
        i = int(diff.argmax())
        raise AssertionError(f"{what}: rel err {err:.3g} > bound {bound:.3g} (reference in {dtype}: {err_ref:.3g}); "
                             f"max abs err {diff[i]:.3g} at flat index {i}, shape {tuple(out.shape)}")


def skip_unless_backend(backend: str, device: str) -> None:
    """Skip with a reason when ``backend`` cannot run on ``device`` here."""
    if backend == "native" and not extension_available():
        pytest.skip("slimrate._C is not built")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")


def random_sparse(out: int, inp: int, sparsity: float, dtype=torch.float32, block=(1, 1), device="cpu"):
    """A dense weight with ~``sparsity`` of its (r, c) blocks zeroed at random, and its SparseMatrix."""
    r, c = block
    w = torch.randn(out, inp, dtype=torch.float64)
    keep = torch.rand(-(-out // r), -(-inp // c)) >= sparsity
    w *= keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    w = w.to(dtype=dtype, device=device)
    return w, SparseMatrix.from_dense(w, block)


SLIM_TRAILER = struct.Struct("<QQI4s")  # a version-2 .slim file's last 24 bytes (docs/slim-format.md §2)
SLIM_START = 8  # b"SLIM" + uint32 version: a version-2 file's payloads start here


def slim_index(data: bytes) -> tuple[int, dict]:
    """(index offset, index JSON) of a version-2 .slim file, read by hand from its trailer."""
    index_offset, index_nbytes, _, _ = SLIM_TRAILER.unpack_from(data, len(data) - SLIM_TRAILER.size)
    return index_offset, json.loads(data[index_offset:index_offset + index_nbytes])


def slim_v2_index_file(payloads: bytes, index: object) -> bytes:
    """A version-2 file: ``payloads`` from byte 8, then ``index`` as JSON, as given, with a valid index checksum."""
    text = json.dumps(index).encode()
    checked = struct.pack("<QQ", SLIM_START + len(payloads), len(text))
    return (b"SLIM" + struct.pack("<I", 2) + payloads + text + checked
            + struct.pack("<I4s", zlib.crc32(text + checked), b"SLIM"))


def slim_v2_file(payloads: bytes, entries: list[dict], metadata: dict | None = None) -> bytes:
    """A version-2 file around ``payloads`` (from byte 8) with these index entries and a valid index checksum."""
    return slim_v2_index_file(payloads, {"tensors": entries, "metadata": {} if metadata is None else metadata})


def rewrite_slim_index(data: bytes, entries: list[dict], metadata: dict | None = None) -> bytes:
    """``data`` (a version-2 file) with another index whose checksum is valid, to test the checks behind it."""
    index_offset, _ = slim_index(data)
    return slim_v2_file(data[SLIM_START:index_offset], entries, metadata)


def slim_v1_header_file(header: object, payloads: bytes) -> bytes:
    """A version-1 file: the 20-byte prefix with a valid checksum, ``header`` as JSON, then ``payloads``, all as
    given (offsets are not laid out)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    start = struct.pack("<4sIQ", b"SLIM", 1, len(text))
    return start + struct.pack("<I", zlib.crc32(start + text)) + text + payloads


def slim_v1_file(entries: list[dict], payloads: list[bytes]) -> bytes:
    """A version-1 file laid out by that version's rules: 20-byte prefix, header JSON, payloads to the end. The
    offsets depend on the header's length, which depends on their digits: lay it out until the length is stable."""
    entries = [{**e, "nbytes": len(p), "crc32": zlib.crc32(p)} for e, p in zip(entries, payloads, strict=True)]
    header_nbytes = 0
    while True:
        offset = 20 + header_nbytes
        for entry in entries:
            entry["offset"] = offset
            offset += entry["nbytes"]
        header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
        if len(header) == header_nbytes:
            break
        header_nbytes = len(header)
    return slim_v1_header_file({"tensors": entries}, b"".join(payloads))


def quantized(t: torch.Tensor, step: float | None) -> torch.Tensor:
    """Independent quantize/dequantize: round(θ/Δ)·Δ in float64, rounded once to θ's dtype (None: θ itself)."""
    return t if step is None else (torch.round(t.double() / step) * step).to(t.dtype)


def assert_same_tensors(got: dict, want: dict) -> None:
    """Same names in the same order, bit-equal tensors of the same dtype and shape."""
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, (name, got[name].dtype, got[name].shape)
        if not torch.equal(got[name], t):
            diff = (got[name].double() - t.double()).abs().flatten()
            raise AssertionError(f"{name}: max abs diff {diff.max():.3g} at {int(diff.argmax())}, {t.dtype}")


def frequency_table(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The "eg" coder's table, independently of slimrate: (table, ranks), the distinct values of q (n,) int32 by
    descending count, ties by smaller value, and the rank of each element."""
    values, inverse, counts = torch.unique(q, return_inverse=True, return_counts=True)  # values ascending
    order = torch.sort(-counts, stable=True).indices                # stable: equal counts keep value order
    rank_of_value = torch.empty_like(order)
    rank_of_value[order] = torch.arange(order.numel())
    return values[order].to(torch.int32), rank_of_value[inverse].to(torch.int32)


def assert_states_equal(a, b, where="state"):
    """Nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(u, v, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"  # NaN == NaN here


SUBPROCESS_TIMEOUT_S = 120


def start_process(args: list[str]) -> subprocess.Popen:
    """``args`` in a subprocess with one thread (bit-identical reductions) in its own session: on a timeout the
    whole process tree (torchrun and its workers) is killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every process below it: torchrun starts each worker in a session of
    its own, out of reach of a signal to torchrun's group.  Linux: descendants are read from /proc."""
    victims, pending = [], [proc.pid]
    while pending:  # collected before the kill: afterwards the orphans' parent is init
        pid = pending.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
            victims += children
            pending += children
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(args: list[str]) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 ARGS`` (2 CPU processes, gloo) on a free local port, as ``start_process``."""
    return start_process([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args])


def finish_process(proc: subprocess.Popen, what: str) -> str:
    """Wait for ``proc`` (killed after SUBPROCESS_TIMEOUT_S); fails unless it exits 0; returns its output."""
    try:
        out, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc)
        out, _ = proc.communicate()
        pytest.fail(f"{what}: no result after {SUBPROCESS_TIMEOUT_S} s (killed); output:\n{out}")
    assert proc.returncode == 0, f"{what}: exit code {proc.returncode}; output:\n{out}"
    return out


def kill_after_checkpoint(proc: subprocess.Popen, checkpoints, step: int, steps: int) -> None:
    """SIGKILL the training run ``proc`` (its whole process tree: torchrun and its workers too) as soon as its
    folder ``checkpoints`` holds the checkpoint of ``step``, checking that it was killed before its last
    checkpoint (of ``steps``)."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not any(s >= step for s, _ in list_checkpoints(checkpoints)):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_process_tree(proc)
            pytest.fail(f"the run ended or stalled before its step-{step} checkpoint; output:\n{proc.communicate()[0]}")
        time.sleep(0.02)
    kill_process_tree(proc)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert list_checkpoints(checkpoints)[-1][0] < steps, "the run finished before the kill"


def varint(v: int) -> bytes:
    """Unsigned LEB128, as the rANS header writes counts and table entries (docs/slim-format.md §7)."""
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


def rans_buffer(symbols: list[int], alphabet: list[int], freq: list[int], scale_bits: int,
                count: int | None = None) -> torch.Tensor:
    """A mode-0 rANS buffer of ``symbols`` with the given table, written in plain Python from the layout of
    docs/slim-format.md §7 (an encoder independent of the C++ one); ``count``: the header's, when forged."""
    state, stream = 1 << 23, bytearray()
    start = [0, *itertools.accumulate(freq)]
    index = {a: j for j, a in enumerate(alphabet)}
    for s in reversed(symbols):
        j = index[s]
        while state >= freq[j] << (31 - scale_bits):
            stream.append(state & 0xFF)
            state >>= 8
        state = ((state // freq[j]) << scale_bits) + state % freq[j] + start[j]
    zigzag = 2 * alphabet[0] if alphabet[0] >= 0 else -2 * alphabet[0] - 1
    header = (bytes([0]) + varint(len(symbols) if count is None else count) + bytes([scale_bits])
              + varint(len(alphabet)) + varint(zigzag)
              + b"".join(varint(b - a - 1) for a, b in itertools.pairwise(alphabet))
              + b"".join(varint(f - 1) for f in freq))
    return torch.tensor(list(header + state.to_bytes(4, "little") + stream[::-1]), dtype=torch.uint8)


def env_with_this_slimrate() -> dict[str, str]:
    """The environment for a child Python that imports the slimrate under test."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(slimrate.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}

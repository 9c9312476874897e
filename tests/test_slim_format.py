"""The .slim bytes: exact round trips, chunked payloads, sizes, version-1 files, corrupt/truncated files, the CLI."""

import itertools
import json
import math
import random
import struct
import zlib
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimrate import SlimWriter, load_slim, ops, save_slim
from slimrate.backslash import SlimFormatError, slim_report
from slimrate.cli import main
from slimrate.ops import extension_available

from helpers import (
    DTYPE_IDS,
    SLIM_TRAILER,
    assert_same_tensors,
    frequency_table,
    quantized,
    rewrite_slim_index,
    slim_index,
    slim_v1_file,
    slim_v2_file,
)

if not extension_available():
    pytest.skip("slimrate._C is not built: the .slim coders (eg_encode, rans_encode) run in C++",
                allow_module_level=True)

CODERS = ["eg", "eg-signed", "rans"]
STEP = 0.01
START = 8  # b"SLIM" + uint32 version: payloads start here in version 2


def small_model() -> nn.Module:
    """Embedding / Linear / LayerNorm, one Linear in bf16, one in fp64, and int64 / bool / 0-d / empty buffers."""
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 33), nn.LayerNorm(33), nn.Linear(33, 7),
                          nn.Linear(7, 5))
    model[3].to(torch.bfloat16)
    model[4].to(torch.float64)
    with torch.no_grad():
        model[2].weight.normal_(1.0, 0.1)
    model[1].register_buffer("token_counts", torch.randint(-2**40, 2**40, (9,)))
    model[2].register_buffer("mask", torch.rand(3, 4) > 0.5)
    model[2].register_buffer("scale", torch.tensor(0.37))
    model[2].register_buffer("empty", torch.empty(0, 4))
    return model


def chunk_bytes(symbols: torch.Tensor, coder: str) -> bytes:
    """One chunk coded straight by the coder ops: rANS, signed EG0, or (for "eg") unsigned EG0 of the ranks."""
    if coder == "rans":
        return ops.rans_encode(symbols).numpy().tobytes()
    return ops.eg_encode(symbols, signed=coder == "eg-signed").numpy().tobytes()


def independent_payload(q: torch.Tensor, coder: str) -> tuple[bytes, dict]:
    """A single-chunk payload built straight from the coder ops, with the "eg" table ranked by Counter."""
    if coder != "eg":
        return chunk_bytes(q, coder), {}
    counts = Counter(q.tolist())
    table = sorted(counts, key=lambda v: (-counts[v], v))
    rank = {v: i for i, v in enumerate(table)}
    table_bytes = ops.eg_encode(torch.tensor(table, dtype=torch.int32), signed=True).numpy().tobytes()
    ranks = torch.tensor([rank[v] for v in q.tolist()], dtype=torch.int32)
    return table_bytes + chunk_bytes(ranks, "eg"), {
        "table_count": len(table), "table_nbytes": len(table_bytes)}


@pytest.mark.parametrize("coder", CODERS)
def test_load_slim_reproduces_quantized_and_lossless_tensors(tmp_path, coder):
    state = small_model().state_dict()
    path = save_slim(state, tmp_path / "m.slim", step=STEP, coder=coder)
    loaded = load_slim(path)
    quantized_names = {n for n, t in state.items() if t.is_floating_point() and t.dim() >= 2}
    assert quantized_names == {"0.weight", "1.weight", "3.weight", "4.weight", "2.empty"}
    assert_same_tensors(loaded, {n: quantized(t, STEP if n in quantized_names else None) for n, t in state.items()})
    _, index = slim_index(path.read_bytes())
    assert [e["coder"] for e in index["tensors"]] == [coder if n in quantized_names else "raw" for n in state]


@pytest.mark.parametrize("shape", [(0,), (1,), (1, 1), (5, 123, 127)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("coder", CODERS)
def test_every_coder_and_dtype_round_trips_empty_single_and_odd_shapes(tmp_path, coder, dtype, shape):
    t = (torch.randn(shape, dtype=torch.float64) * 0.05).to(dtype)
    loaded = load_slim(save_slim({"t": t}, tmp_path / "m.slim", step={"t": STEP}, coder=coder))
    assert_same_tensors(loaded, {"t": quantized(t, STEP)})


@pytest.mark.parametrize("chunk_numel", [1, 7, 615, 616, 10_000])
@pytest.mark.parametrize("coder", CODERS)
def test_chunks_are_coded_independently_and_round_trip(tmp_path, coder, chunk_numel):
    t = torch.randn(5, 123) * 0.05  # 615 elements: chunk_numel 7 leaves a last chunk of 6
    with SlimWriter(tmp_path / "m.slim", chunk_numel=chunk_numel) as writer:
        writer.add("t", t, step=STEP, coder=coder)
    data = (tmp_path / "m.slim").read_bytes()
    _, index = slim_index(data)
    (entry,) = index["tensors"]
    q = torch.round(t.double().reshape(-1) / STEP).to(torch.int32)
    table, ranks = frequency_table(q)
    symbols = ranks if coder == "eg" else q
    chunks = [chunk_bytes(symbols[i:i + chunk_numel], coder) for i in range(0, q.numel(), chunk_numel)]
    table_bytes = ops.eg_encode(table, signed=True).numpy().tobytes() if coder == "eg" else b""
    assert entry["chunk_numel"] == chunk_numel and entry["chunk_nbytes"] == [len(c) for c in chunks]
    assert data[entry["offset"]:entry["offset"] + entry["nbytes"]] == table_bytes + b"".join(chunks)
    assert_same_tensors(load_slim(tmp_path / "m.slim"), {"t": quantized(t, STEP)})


def test_save_slim_accepts_a_module_and_a_step_per_tensor(tmp_path):
    model = small_model()
    state = model.state_dict()
    steps = {"1.weight": 0.05, "1.bias": 0.002, "0.weight": None}
    loaded = load_slim(save_slim(model, tmp_path / "m.slim", step=steps))
    assert_same_tensors(loaded, {n: quantized(t, steps.get(n)) for n, t in state.items()})


def test_max_error_bounds_the_reconstruction_error(tmp_path):
    state = {"w": torch.randn(64, 65) * 0.1, "b": torch.randn(65)}
    loaded = load_slim(save_slim(state, tmp_path / "m.slim", max_error=0.003, coder="rans"))
    # Δ = 0.006 ⇒ |θ − θ̂| ≤ Δ/2 in float64, plus rounding θ̂ to float32: half an ulp of |θ̂| < 1.
    assert (loaded["w"] - state["w"]).abs().max() <= 0.003 + torch.finfo(torch.float32).eps / 2
    assert torch.equal(loaded["b"], state["b"])


def test_load_slim_map_location_moves_tensors(tmp_path):
    path = save_slim({"w": torch.randn(3, 4)}, tmp_path / "m.slim", step=STEP)
    assert load_slim(path, map_location="meta")["w"].device.type == "meta"
    assert load_slim(path, map_location=torch.device("cpu"))["w"].device.type == "cpu"
    with pytest.raises(TypeError, match="map_location"):
        load_slim(path, map_location={"cuda:0": "cpu"})


def test_frequency_table_ranks_symbols_by_descending_count():
    q = torch.tensor([3, -1, 3, 0, 3, -1, 7, 0, 5], dtype=torch.int32)
    table, ranks = frequency_table(q)
    assert table.tolist() == [3, -1, 0, 5, 7]  # counts 3, 2, 2, 1, 1: ties by value
    assert torch.equal(table[ranks.long()], q)


@pytest.mark.parametrize("coder", CODERS)
def test_sizes_in_index_and_report_equal_the_file_sections(tmp_path, coder):
    state = small_model().state_dict()
    path = save_slim(state, tmp_path / "m.slim", step=STEP, coder=coder, metadata={"source": "test"})
    data = path.read_bytes()
    index_offset, index = slim_index(data)
    entries = index["tensors"]
    assert data[:START] == b"SLIM\x02\x00\x00\x00" and data[-4:] == b"SLIM" and index["metadata"] == {"source": "test"}
    assert START + sum(e["nbytes"] for e in entries) == index_offset
    assert len(data) == index_offset + len(json.dumps(index, separators=(",", ":"))) + SLIM_TRAILER.size
    rows = slim_report(path)
    assert [r["bytes"] for r in rows] == [e["nbytes"] for e in entries]
    for row, (name, t) in zip(rows, state.items(), strict=True):
        assert row["name"] == name and row["shape"] == tuple(t.shape) and row["stored_bits"] == 8 * t.element_size()
        if t.numel():
            assert row["bits_per_param"] == pytest.approx(8 * row["bytes"] / t.numel())
            assert row["ratio"] == pytest.approx(4 * t.numel() / row["bytes"])
    for entry in entries:
        if entry["coder"] == "raw":
            continue
        assert entry.get("table_nbytes", 0) + sum(entry["chunk_nbytes"]) == entry["nbytes"]
        if entry["coder"] != "eg":
            continue
        q = torch.round(state[entry["name"]].double().reshape(-1) / STEP).to(torch.int32)
        table, ranks = frequency_table(q)
        assert entry["table_count"] == table.numel()
        assert entry["table_nbytes"] == math.ceil(ops.eg_code_length(table, signed=True) / 8)
        assert entry["nbytes"] - entry["table_nbytes"] == math.ceil(ops.eg_code_length(ranks, signed=False) / 8)


def test_save_slim_writes_atomically_and_overwrites(tmp_path):
    save_slim({"w": torch.randn(4, 4)}, tmp_path / "m.slim", step=STEP)
    save_slim({"v": torch.randn(2, 2)}, tmp_path / "m.slim", step=STEP)
    assert [p.name for p in tmp_path.iterdir()] == ["m.slim"]
    assert list(load_slim(tmp_path / "m.slim")) == ["v"]


# Payloads written by slimrate's version-1 writer for V1_STATE (step 0.01 for w, 0.25 for h, 0.5 for e; n raw).
V1_STATE = {"w": torch.tensor([[0.031, -0.012, 0.0], [0.049, 0.031, -0.2]]),
            "h": torch.tensor([[1.5, -0.25]], dtype=torch.bfloat16), "e": torch.empty(0, 3),
            "n": torch.tensor([7, -2], dtype=torch.int64)}
V1_STEPS = {"w": 0.01, "h": 0.25, "e": 0.5}
V1_PAYLOADS = {
    "eg": {"w": ("38285160b21680", {"table_count": 5, "table_nbytes": 4}),
           "h": ("434050", {"table_count": 2, "table_nbytes": 2}), "e": ("", {"table_count": 0, "table_nbytes": 0})},
    "eg-signed": {"w": ("3a8b3828", {}), "h": ("1a80", {}), "e": ("", {})},
    "rans": {"w": ("010603000000ffffffff000000000500000003000000ecffffff", {}), "h": ("010206000000ffffffff", {}),
             "e": ("0000100000008000", {})},
}
V1_RAW_N = "0700000000000000feffffffffffffff"


def committed_slim_v1_file(coder: str) -> bytes:
    entries, payloads = [], []
    for name, t in V1_STATE.items():
        payload, fields = V1_PAYLOADS[coder][name] if name in V1_STEPS else (V1_RAW_N, {})
        entries.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                        "coder": coder if name in V1_STEPS else "raw", "step": V1_STEPS.get(name), **fields})
        payloads.append(bytes.fromhex(payload))
    return slim_v1_file(entries, payloads)


@pytest.mark.parametrize("coder", CODERS)
def test_version_1_files_still_load(tmp_path, coder):
    (tmp_path / "v1.slim").write_bytes(committed_slim_v1_file(coder))
    want = {n: quantized(t, V1_STEPS.get(n)) for n, t in V1_STATE.items()}
    assert_same_tensors(load_slim(tmp_path / "v1.slim"), want)
    # The same tensors written now: each non-empty payload is version 1's, as its single chunk.
    _, index = slim_index(save_slim(V1_STATE, tmp_path / "v2.slim", step=V1_STEPS, coder=coder).read_bytes())
    data = (tmp_path / "v2.slim").read_bytes()
    for entry in index["tensors"]:
        if entry["name"] in ("w", "h"):
            assert data[entry["offset"]:entry["offset"] + entry["nbytes"]].hex() == V1_PAYLOADS[coder][entry["name"]][0]


@pytest.mark.parametrize("coder", CODERS)
def test_random_version_1_files_load(tmp_path, coder):
    state = {"a": torch.randn(5, 123) * 0.05, "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(1, 1)}
    entries, payloads = [], []
    for name, t in state.items():
        payload, fields = independent_payload(torch.round(t.double().reshape(-1) / STEP).to(torch.int32), coder)
        entries.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                        "coder": coder, "step": STEP, **fields})
        payloads.append(payload)
    (tmp_path / "v1.slim").write_bytes(slim_v1_file(entries, payloads))
    assert_same_tensors(load_slim(tmp_path / "v1.slim"), {n: quantized(t, STEP) for n, t in state.items()})


@pytest.mark.parametrize("coder", CODERS)
def test_version_1_empty_shape_over_a_payload_is_refused(tmp_path, coder):
    """A version-1 entry whose shape says "no elements" but whose payload holds symbols: the bytes would be
    silently ignored, so the file is refused (version 2's chunk sizes catch the same edit)."""
    payload, fields = independent_payload(torch.arange(-3, 9, dtype=torch.int32), coder)
    entry = {"name": "w", "shape": [0, 4], "dtype": "float32", "coder": coder, "step": 0.5, **fields}
    (tmp_path / "v1.slim").write_bytes(slim_v1_file([entry], [payload]))
    with pytest.raises(SlimFormatError, match="an empty tensor with a payload"):
        load_slim(tmp_path / "v1.slim")


def fuzz_file(tmp_path, version: int, coder: str) -> tuple[bytes, list[int]]:
    """A small file of the given version and the boundaries of its sections."""
    if version == 1:
        data = committed_slim_v1_file(coder)
        header_end = 20 + struct.unpack_from("<Q", data, 8)[0]
        return data, [0, 4, 8, 16, 20, header_end, len(data)]
    state = {"w": torch.randn(6, 7) * 0.05, "b": torch.randn(7), "n": torch.arange(3)}
    data = save_slim(state, tmp_path / "m.slim", step=STEP, coder=coder).read_bytes()
    index_offset, index = slim_index(data)
    offsets = [e["offset"] for e in index["tensors"]]
    return data, [0, 4, START, *offsets, index_offset, len(data) - SLIM_TRAILER.size, len(data) - 8, len(data) - 4,
                  len(data)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("coder", CODERS)
def test_every_mutation_of_a_slim_file_raises_slim_format_error(tmp_path, coder, version):
    data, bounds = fuzz_file(tmp_path, version, coder)
    regions = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    rng = random.Random(zlib.crc32(f"{coder}{version}".encode()))
    bad = tmp_path / "bad.slim"
    cuts = {n for b in bounds for n in (b - 1, b, b + 1) if 0 <= n < len(data)} | set(rng.sample(range(len(data)), 50))
    mutations = [data[:n] for n in sorted(cuts)]  # truncated at and around every boundary, and anywhere
    for _ in range(400):
        mutated = bytearray(data)
        if rng.random() < 0.8:
            lo, hi = rng.choice(regions)
            for i in rng.sample(range(lo, hi), min(hi - lo, rng.randint(1, 3))):
                mutated[i] ^= rng.randint(1, 255)
        else:
            mutated += bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 8)))
        mutations.append(bytes(mutated))
    for mutated in mutations:
        bad.write_bytes(mutated)
        with pytest.raises(SlimFormatError):
            load_slim(bad)


@pytest.mark.parametrize("coder", ["eg", "rans"])
def test_index_fields_are_checked_behind_a_valid_checksum(tmp_path, coder):
    data = save_slim({"w": torch.randn(5, 6), "b": torch.randn(6)}, tmp_path / "m.slim", step=STEP,
                     coder=coder).read_bytes()
    _, index = slim_index(data)
    w, b = index["tensors"]
    changes = [("shape", [2**40, 2**20]), ("shape", [-1, 6]), ("shape", "56"), ("dtype", "complex64"),
               ("coder", "zip"), ("offset", 0), ("nbytes", 10**15), ("nbytes", -1), ("step", 0.0), ("step", None),
               ("table_count", 10**12), ("table_nbytes", 10**9), ("crc32", "x"), ("extra", 1),
               ("chunk_numel", 0), ("chunk_numel", 1.0), ("chunk_numel", 7), ("chunk_nbytes", [1] * 30),
               ("chunk_nbytes", [-1]), ("chunk_nbytes", "3"), ("chunk_nbytes", [w["chunk_nbytes"][0] + 1])]
    bad = tmp_path / "bad.slim"
    for key, value in changes:
        bad.write_bytes(rewrite_slim_index(data, [{**w, key: value}, b]))
        with pytest.raises(SlimFormatError):
            load_slim(bad)
    for entries, metadata, match in [([w, {**b, "name": "w"}], {}, "duplicate"), ([w, b], {"k": 1}, "metadata"),
                                     ([w, b], ["k"], "metadata"), ([w, {**b, "chunk_numel": 6}], {}, "fields")]:
        bad.write_bytes(rewrite_slim_index(data, entries, metadata))
        with pytest.raises(SlimFormatError, match=match):
            load_slim(bad)


@pytest.mark.parametrize(("version", "match"), [(0, "unsupported .slim version 0"), (3, "reads versions 1 and 2")])
def test_unknown_versions_are_refused(tmp_path, version, match):
    data = bytearray(save_slim({"w": torch.randn(2, 2)}, tmp_path / "m.slim", step=STEP).read_bytes())
    data[4:8] = struct.pack("<I", version)
    (tmp_path / "bad.slim").write_bytes(data)
    with pytest.raises(SlimFormatError, match=match):
        load_slim(tmp_path / "bad.slim")


def test_a_deeply_nested_index_raises_slim_format_error(tmp_path):
    index = b"[" * 100_000
    checked = struct.pack("<QQ", START, len(index))
    (tmp_path / "bad.slim").write_bytes(b"SLIM\x02\x00\x00\x00" + index + checked
                                        + struct.pack("<I4s", zlib.crc32(index + checked), b"SLIM"))
    with pytest.raises(SlimFormatError, match="malformed index"):
        load_slim(tmp_path / "bad.slim")


def forged_payload_file(tmp_path, coder: str, payload: bytes, **fields) -> None:
    """bad.slim: one 4×4 tensor whose payload is ``payload``, with a valid index and valid checksums."""
    data = save_slim({"w": torch.randn(4, 4)}, tmp_path / "m.slim", step=STEP, coder=coder).read_bytes()
    _, index = slim_index(data)
    (entry,) = index["tensors"]
    entry.update({"chunk_nbytes": [len(payload) - fields.get("table_nbytes", 0)], **fields}, offset=START,
                 nbytes=len(payload), crc32=zlib.crc32(payload))
    (tmp_path / "bad.slim").write_bytes(slim_v2_file(payload, [entry]))


def eg_bytes(values: list[int], signed: bool) -> bytes:
    return ops.eg_encode(torch.tensor(values, dtype=torch.int32), signed=signed).numpy().tobytes()


def test_ranks_outside_the_table_raise_slim_format_error(tmp_path):
    table = eg_bytes([0], signed=True)
    forged_payload_file(tmp_path, "eg", table + eg_bytes([3] * 16, signed=False), table_count=1,
                        table_nbytes=len(table))
    with pytest.raises(SlimFormatError, match="outside the table"):
        load_slim(tmp_path / "bad.slim")
    chunks = [eg_bytes([0] * 10, signed=False), eg_bytes([0] * 5 + [1], signed=False)]  # chunk 1 has rank 1
    forged_payload_file(tmp_path, "eg", table + b"".join(chunks), table_count=1, table_nbytes=len(table),
                        chunk_numel=10, chunk_nbytes=[len(c) for c in chunks])
    with pytest.raises(SlimFormatError, match=r"chunk 1 of 2 .*: rank 1 of symbol 5 is outside the table"):
        load_slim(tmp_path / "bad.slim")


@pytest.mark.parametrize("coder", CODERS)
def test_undecodable_payloads_with_valid_checksums_raise_slim_format_error(tmp_path, coder):
    table = eg_bytes([0], signed=True)
    fields = {"table_count": 1, "table_nbytes": len(table)} if coder == "eg" else {}
    for junk in [bytes(1), bytes(2), b"\x00\x01"]:  # too short, or an EG0 prefix that runs past the end
        forged_payload_file(tmp_path, coder, (table if coder == "eg" else b"") + junk, **fields)
        with pytest.raises(SlimFormatError):
            load_slim(tmp_path / "bad.slim")


def test_a_rans_chunk_holding_another_count_raises_slim_format_error(tmp_path):
    chunks = [ops.rans_encode(torch.zeros(n, dtype=torch.int32)).numpy().tobytes() for n in (8, 7)]  # 16 = 8 + 8
    forged_payload_file(tmp_path, "rans", b"".join(chunks), chunk_numel=8, chunk_nbytes=[len(c) for c in chunks])
    with pytest.raises(SlimFormatError, match="chunk 1 of 2 .*: the rANS buffer holds 7 symbols, not 8"):
        load_slim(tmp_path / "bad.slim")


def test_a_forged_huge_rans_shape_is_refused_before_allocation(tmp_path):
    # The index (its checksum recomputed) claims 2^46 elements; the buffer says 16. Nothing that large is allocated,
    # even with no limit on the declared size.
    payload = ops.rans_encode(torch.zeros(16, dtype=torch.int32)).numpy().tobytes()
    forged_payload_file(tmp_path, "rans", payload, shape=[2**23, 2**23], chunk_numel=2**46)
    with pytest.raises(SlimFormatError, match="holds 16 symbols, not 70368744177664"):
        load_slim(tmp_path / "bad.slim", max_bytes=math.inf)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"step": 0.0}, "step"), ({"step": -1.0}, "step"), ({"step": float("nan")}, "step"),
    ({"step": 0.1, "max_error": 0.1}, "exactly one"), ({}, "exactly one"), ({"max_error": 0.0}, "max_error"),
    ({"step": 0.1, "coder": "zip"}, "coder"), ({"step": {"nope": 0.1}}, "nope"), ({"step": {"n": 0.1}}, "float"),
])
def test_save_slim_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_slim({"w": torch.randn(3, 3), "n": torch.arange(4)}, tmp_path / "m.slim", **kwargs)
    assert not (tmp_path / "m.slim").exists()


@pytest.mark.parametrize(("source", "match"), [("w", "nn.Module"), (torch.randn(3), "nn.Module"), (5, "nn.Module"),
                                               ([("w",)], "pairs"), ([(1, torch.randn(3))], "str name"),
                                               ({"w": [1.0]}, "dense tensor")])
def test_save_slim_rejects_what_is_not_tensors(tmp_path, source, match):
    with pytest.raises(TypeError, match=match):
        save_slim(source, tmp_path / "m.slim", step=STEP)
    assert list(tmp_path.iterdir()) == []


def test_save_slim_rejects_unquantizable_tensors(tmp_path):
    with pytest.raises(ValueError, match="w: x: expected finite"):
        save_slim({"w": torch.tensor([[1.0, float("nan")]])}, tmp_path / "m.slim", step=STEP)
    with pytest.raises(ValueError, match="w: x/step.*larger step"):
        save_slim({"w": torch.tensor([[1e9, 0.0]])}, tmp_path / "m.slim", step=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        save_slim({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "m.slim", step=STEP)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("dtype", "max_error"), [(torch.float16, 32.0), (torch.bfloat16, 1e38), (torch.float32, 1e38)],
                         ids=lambda v: DTYPE_IDS.get(v, str(v)))
def test_max_error_refuses_values_that_would_load_as_inf(tmp_path, dtype, max_error):
    # float16: 65504 / Δ = 65504 / 64 = 1023.5 rounds to 1024 (ties to even) and 1024 · 64 = 65536 is inf in float16.
    biggest = torch.finfo(dtype).max
    w = torch.tensor([[0.5, -biggest], [biggest, 1.0]], dtype=dtype)
    with pytest.raises(ValueError, match=r"^w: x: .*\bflat index 1\b"):  # -biggest, the first to overflow
        save_slim({"w": w}, tmp_path / "m.slim", max_error=max_error)
    assert list(tmp_path.iterdir()) == []
    loaded = load_slim(save_slim({"w": w}, tmp_path / "m.slim", max_error=max_error / 2))["w"]
    # |θ − θ̂| ≤ max_error plus half an ulp of θ̂'s dtype, which is at most |θ̂| · eps / 2.
    assert (loaded.double() - w.double()).abs().max() <= max_error / 2 + biggest * torch.finfo(dtype).eps / 2


def test_a_step_above_the_dtype_maximum_is_refused_on_save(tmp_path):
    # Every value here quantizes to 0, but a file with this step is one the reader refuses.
    with pytest.raises(ValueError, match="step for 'h': 100000 is above torch.float16's largest value 65504"):
        save_slim({"h": torch.randn(2, 2, dtype=torch.float16)}, tmp_path / "m.slim", step=1e5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("coder", ["eg", "rans"])
def test_cli_compress_inspect_decompress_round_trip(tmp_path, capsys, coder):
    state = {n: t.contiguous() for n, t in small_model().state_dict().items()}
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    slim, out = tmp_path / "model.slim", tmp_path / "out.safetensors"
    assert main(["compress", str(tmp_path / "ckpt"), "-o", str(slim), "--step", str(STEP), "--coder", coder]) == 0
    assert main(["inspect", str(slim)]) == 0
    table = capsys.readouterr().out
    assert "bits/param" in table and all(name in table for name in state)
    assert main(["decompress", str(slim), "-o", str(out)]) == 0
    assert_same_tensors(load_file(out), load_slim(slim))
    assert main(["compress", str(out), "-o", str(slim), "--max-error", "0.005"]) == 0


def test_cli_inspect_ratio_is_against_the_stored_dtype(tmp_path, capsys):
    """A bf16 matrix: ratio = its 2 bytes/param over the payload's bytes (fp32 would double it)."""
    w = (torch.randn(40, 30) * 0.05).bfloat16()
    path = save_slim({"w": w}, tmp_path / "m.slim", step=STEP)
    (row,) = slim_report(path)
    assert main(["inspect", str(path)]) == 0
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[0] == "w" and float(line[-1]) == pytest.approx(2 * w.numel() / row["bytes"], abs=0.005)

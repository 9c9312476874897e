"""The .slim file: exact round trips, sizes, corrupt/truncated files, the compress/inspect/decompress CLI."""

import json
import math
import random
import struct
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimrate import load_slim, ops, save_slim
from slimrate.backslash import SlimFormatError, slim_report
from slimrate.backslash.slim_coding import frequency_table
from slimrate.cli import main
from slimrate.ops import extension_available

from helpers import needs_slim_file, needs_slim_writer

if not extension_available():
    pytest.skip("slimrate._C is not built: the .slim coders (eg_encode, rans_encode) run in C++",
                allow_module_level=True)

CODERS = ["eg", "eg-signed", "rans"]
PREFIX = struct.Struct("<4sIQI")
STEP = 0.01


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


def expected_tensor(t: torch.Tensor, step: float | None) -> torch.Tensor:
    """Independent quantize/dequantize: round(θ/Δ)·Δ in float64, rounded once to θ's dtype."""
    return t if step is None else (torch.round(t.double() / step) * step).to(t.dtype)


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        if not torch.equal(got[name], t):
            diff = (got[name].double() - t.double()).abs().flatten()
            raise AssertionError(f"{name}: max abs diff {diff.max():.3g} at {int(diff.argmax())}, {t.dtype}")


def read_header(data: bytes) -> tuple[int, list[dict]]:
    _, _, header_nbytes, _ = PREFIX.unpack_from(data)
    return PREFIX.size + header_nbytes, json.loads(data[PREFIX.size:PREFIX.size + header_nbytes])["tensors"]


def rewrite_header(data: bytes, entries: list[dict], payloads: bytes | None = None) -> bytes:
    """A file with a modified header whose checksum is valid, to test the field checks behind the checksum."""
    start, _ = read_header(data)
    header = json.dumps({"tensors": entries}).encode()
    prefix = struct.pack("<4sIQ", b"SLIM", 1, len(header))
    return prefix + struct.pack("<I", zlib.crc32(prefix + header)) + header + (data[start:] if payloads is None
                                                                                 else payloads)


@pytest.mark.parametrize("coder", CODERS)
def test_load_slim_reproduces_quantized_and_lossless_tensors(tmp_path, coder):
    state = small_model().state_dict()
    path = save_slim(state, tmp_path / "m.slim", step=STEP, coder=coder)
    loaded = load_slim(path)
    quantized = {n for n, t in state.items() if t.is_floating_point() and t.dim() >= 2}
    assert quantized == {"0.weight", "1.weight", "3.weight", "4.weight", "2.empty"}
    assert_same(loaded, {n: expected_tensor(t, STEP if n in quantized else None) for n, t in state.items()})
    assert [e["coder"] for e in read_header(path.read_bytes())[1]] == [coder if n in quantized else "raw"
                                                                        for n in state]


def test_save_slim_accepts_a_module_and_a_step_per_tensor(tmp_path):
    model = small_model()
    state = model.state_dict()
    steps = {"1.weight": 0.05, "1.bias": 0.002, "0.weight": None}
    loaded = load_slim(save_slim(model, tmp_path / "m.slim", step=steps))
    assert_same(loaded, {n: expected_tensor(t, steps.get(n)) for n, t in state.items()})


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
def test_sizes_in_header_and_report_equal_the_file_sections(tmp_path, coder):
    state = small_model().state_dict()
    path = save_slim(state, tmp_path / "m.slim", step=STEP, coder=coder)
    data = path.read_bytes()
    start, entries = read_header(data)
    assert start + sum(e["nbytes"] for e in entries) == len(data)
    assert [r["bytes"] for r in slim_report(path)] == [e["nbytes"] for e in entries]
    for row, (name, t) in zip(slim_report(path), state.items(), strict=True):
        assert row["name"] == name and row["shape"] == tuple(t.shape)
        if t.numel():
            assert row["bits_per_param"] == pytest.approx(8 * row["bytes"] / t.numel())
            assert row["ratio"] == pytest.approx(4 * t.numel() / row["bytes"])
    for entry in entries:
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


@pytest.mark.parametrize("coder", CODERS)
def test_every_mutation_of_a_slim_file_raises_slim_format_error(tmp_path, coder):
    state = {"w": torch.randn(6, 7) * 0.05, "b": torch.randn(7), "n": torch.arange(3)}
    data = save_slim(state, tmp_path / "m.slim", step=STEP, coder=coder).read_bytes()
    start, _ = read_header(data)
    regions = [(0, PREFIX.size), (PREFIX.size, start), (start, len(data))]  # prefix, header, payloads
    rng = random.Random(zlib.crc32(coder.encode()))
    bad = tmp_path / "bad.slim"
    for _ in range(2000):
        kind = rng.choice(["flip", "flip", "truncate", "append"])
        mutated = bytearray(data)
        if kind == "flip":
            lo, hi = rng.choice(regions)
            for i in rng.sample(range(lo, hi), rng.randint(1, 3)):
                mutated[i] ^= rng.randint(1, 255)
        elif kind == "truncate":
            del mutated[rng.randrange(len(data)):]
        else:
            mutated += bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 8)))
        bad.write_bytes(bytes(mutated))
        with pytest.raises(SlimFormatError):
            load_slim(bad)


@pytest.mark.parametrize("coder", ["eg", "rans"])
def test_header_fields_are_checked_behind_a_valid_checksum(tmp_path, coder):
    data = save_slim({"w": torch.randn(5, 6), "b": torch.randn(6)}, tmp_path / "m.slim", step=STEP,
                     coder=coder).read_bytes()
    _, entries = read_header(data)
    changes = [("shape", [2**40, 2**20]), ("shape", [-1, 6]), ("shape", "56"), ("dtype", "complex64"),
               ("coder", "zip"), ("offset", 0), ("nbytes", 10**15), ("nbytes", -1), ("step", 0.0), ("step", None),
               ("table_count", 10**12), ("table_nbytes", 10**9), ("crc32", "x"), ("extra", 1)]
    bad = tmp_path / "bad.slim"
    for key, value in changes:
        bad.write_bytes(rewrite_header(data, [{**entries[0], key: value}, entries[1]]))
        with pytest.raises(SlimFormatError):
            load_slim(bad)
    bad.write_bytes(rewrite_header(data, [entries[0], {**entries[1], "name": "w"}]))
    with pytest.raises(SlimFormatError, match="duplicate"):
        load_slim(bad)


def test_a_deeply_nested_header_raises_slim_format_error(tmp_path):
    header = b"[" * 100_000
    prefix = struct.pack("<4sIQ", b"SLIM", 1, len(header))
    (tmp_path / "bad.slim").write_bytes(prefix + struct.pack("<I", zlib.crc32(prefix + header)) + header)
    with pytest.raises(SlimFormatError, match="malformed header"):
        load_slim(tmp_path / "bad.slim")


def forged_payload_file(tmp_path, coder: str, payload: bytes, **fields) -> None:
    """bad.slim: one 4×4 tensor whose payload is ``payload``, with a valid header and valid checksums."""
    data = save_slim({"w": torch.randn(4, 4)}, tmp_path / "m.slim", step=STEP, coder=coder).read_bytes()
    _, (entry,) = read_header(data)
    entry.update(fields, nbytes=len(payload), crc32=zlib.crc32(payload))
    data = rewrite_header(data, [entry], b"")
    (tmp_path / "bad.slim").write_bytes(rewrite_header(data, [{**entry, "offset": len(data)}], payload))


def test_ranks_outside_the_table_raise_slim_format_error(tmp_path):
    table = ops.eg_encode(torch.tensor([0], dtype=torch.int32), signed=True).numpy().tobytes()
    ranks = ops.eg_encode(torch.full((16,), 3, dtype=torch.int32), signed=False).numpy().tobytes()
    forged_payload_file(tmp_path, "eg", table + ranks, table_count=1, table_nbytes=len(table))
    with pytest.raises(SlimFormatError, match="outside the table"):
        load_slim(tmp_path / "bad.slim")


@pytest.mark.parametrize("coder", CODERS)
def test_undecodable_payloads_with_valid_checksums_raise_slim_format_error(tmp_path, coder):
    table = ops.eg_encode(torch.tensor([0], dtype=torch.int32), signed=True).numpy().tobytes()
    fields = {"table_count": 1, "table_nbytes": len(table)} if coder == "eg" else {}
    for junk in [bytes(1), bytes(2), b"\x00\x01"]:  # too short, or an EG0 prefix that runs past the end
        forged_payload_file(tmp_path, coder, (table if coder == "eg" else b"") + junk, **fields)
        with pytest.raises(SlimFormatError):
            load_slim(tmp_path / "bad.slim")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"step": 0.0}, "step"), ({"step": -1.0}, "step"), ({"step": float("nan")}, "step"),
    ({"step": 0.1, "max_error": 0.1}, "exactly one"), ({}, "exactly one"), ({"max_error": 0.0}, "max_error"),
    ({"step": 0.1, "coder": "zip"}, "coder"), ({"step": {"nope": 0.1}}, "nope"), ({"step": {"n": 0.1}}, "float"),
])
def test_save_slim_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_slim({"w": torch.randn(3, 3), "n": torch.arange(4)}, tmp_path / "m.slim", **kwargs)
    assert not (tmp_path / "m.slim").exists()


def test_save_slim_rejects_unquantizable_tensors(tmp_path):
    with pytest.raises(ValueError, match="w: x: expected finite"):
        save_slim({"w": torch.tensor([[1.0, float("nan")]])}, tmp_path / "m.slim", step=STEP)
    with pytest.raises(ValueError, match="w: x/step.*larger step"):
        save_slim({"w": torch.tensor([[1e9, 0.0]])}, tmp_path / "m.slim", step=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        save_slim({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "m.slim", step=STEP)


@needs_slim_writer
@needs_slim_file
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
    assert_same(load_file(out), load_slim(slim))
    assert main(["compress", str(out), "-o", str(slim), "--max-error", "0.005"]) == 0


def test_cli_inspect_ratio_is_against_the_stored_dtype(tmp_path, capsys):
    """A bf16 matrix: ratio = its 2 bytes/param over the payload's bytes (fp32 would double it)."""
    w = (torch.randn(40, 30) * 0.05).bfloat16()
    path = save_slim({"w": w}, tmp_path / "m.slim", step=STEP)
    (row,) = slim_report(path)
    assert main(["inspect", str(path)]) == 0
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[0] == "w" and float(line[-1]) == pytest.approx(2 * w.numel() / row["bytes"], abs=0.005)

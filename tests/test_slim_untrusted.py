""".slim files from untrusted hands: every malformed index field, forged size or corrupt payload raises
SlimFormatError naming the file, and a file is refused before it decodes to more than max_bytes."""

import json
import math
import os
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from slimrate import SlimFile, load_slim, load_slim_into, ops, save_slim
from slimrate.backslash import SlimFormatError
from slimrate.ops import extension_available

from helpers import slim_index, slim_v1_file, slim_v1_header_file, slim_v2_file, slim_v2_index_file, varint

if not extension_available():
    pytest.skip("slimrate._C is not built: the .slim coders (eg_encode, rans_encode) run in C++",
                allow_module_level=True)

STEP = 0.01
# Values of the wrong JSON type or range for some field; each is tried in every field of an entry.
WRONG_VALUES = [None, [], [7], {}, {"k": 1}, "x", 1.5, float("nan"), True, 2**64, -1]
VALID_EDITS = (("name", "x"), ("step", 1.5))  # a str name, and a float step of a coded tensor, are well-formed


def small_file(tmp_path, version: int) -> tuple[bytes, dict]:
    """(payload bytes, index or header) of a file of this version holding an "eg" matrix (one chunk of ~30
    distinct symbols) and a raw vector."""
    data = save_slim({"w": torch.randn(5, 6), "b": torch.randn(6)}, tmp_path / "m.slim", step={"w": STEP}).read_bytes()
    index_offset, index = slim_index(data)
    if version == 2:
        return data[8:index_offset], index
    entries = [{k: v for k, v in e.items() if k not in ("chunk_numel", "chunk_nbytes")} for e in index["tensors"]]
    v1 = slim_v1_file(entries, [data[e["offset"]:e["offset"] + e["nbytes"]] for e in entries])
    header_end = 20 + struct.unpack_from("<Q", v1, 8)[0]
    return v1[header_end:], json.loads(v1[20:header_end])


def with_header(payloads: bytes, header: dict, version: int) -> bytes:
    """A file of this version whose index (version 2) or header (version 1) is ``header``, checksums valid. A
    version-1 header's offsets were laid out for the original header: the field checks come before the layout's."""
    return slim_v1_header_file(header, payloads) if version == 1 else slim_v2_index_file(payloads, header)


def header_edits(index: dict):
    """(what was edited, the edited index): every field of every entry and every element of its lists set to each
    wrong value, each entry replaced by one, and the top-level keys set to each."""
    for i, entry in enumerate(index["tensors"]):
        for key, value in entry.items():
            for wrong in WRONG_VALUES:
                valid = (key, wrong) in VALID_EDITS and (key == "name" or entry["coder"] != "raw")
                if not (valid or _same(wrong, value)):
                    yield f"tensor {i} {key}={wrong!r}", _replace_entry(index, i, {**entry, key: wrong})
                if isinstance(value, list) and value:
                    edited = {**entry, key: [wrong, *value[1:]]}
                    yield f"tensor {i} {key}[0]={wrong!r}", _replace_entry(index, i, edited)
        for wrong in WRONG_VALUES:
            yield f"tensor {i}={wrong!r}", _replace_entry(index, i, wrong)
    for key, value in index.items():
        for wrong in WRONG_VALUES:
            if not _same(wrong, value):
                yield f"{key}={wrong!r}", {**index, key: wrong}


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _replace_entry(index: dict, i: int, entry: object) -> dict:
    return {**index, "tensors": [entry if j == i else e for j, e in enumerate(index["tensors"])]}


@pytest.mark.parametrize("version", [1, 2])
def test_every_index_field_of_a_wrong_type_raises_slim_format_error_naming_the_file(tmp_path, version):
    payloads, index = small_file(tmp_path, version)
    bad, failures, edits = tmp_path / "bad.slim", [], 0
    bad.write_bytes(with_header(payloads, index, version))
    assert list(load_slim(bad)) == ["w", "b"]
    for what, edited in header_edits(index):
        bad.write_bytes(with_header(payloads, edited, version))
        edits += 1
        try:
            load_slim(bad)
            failures.append(f"{what}: loaded")
        except SlimFormatError as e:
            if not str(e).startswith(f"{bad}: "):
                failures.append(f"{what}: {e} does not name the file")
        except Exception as e:  # noqa: BLE001 - any other type is the failure this test looks for
            failures.append(f"{what}: {type(e).__name__}: {e}")
    assert edits > 200 and failures == [], "\n".join(failures)


def empty_entry(shape: list[int], coder: str) -> dict:
    fields = {"step": None} if coder == "raw" else {"step": STEP, "chunk_numel": 1, "chunk_nbytes": []}
    if coder == "eg":
        fields.update(table_count=0, table_nbytes=0)
    return {"name": "e", "shape": shape, "dtype": "float32", "coder": coder, "offset": 8, "nbytes": 0, "crc32": 0,
            **fields}


@pytest.mark.parametrize("coder", ["raw", "eg", "rans"])
@pytest.mark.parametrize("shape", [[2**63, 0], [15, 2**62, 0], [2**40, 2**40, 0], [2**49, 0]],
                         ids=lambda s: "x".join(map(str, s)))
def test_an_empty_shape_with_a_huge_dimension_is_refused(tmp_path, shape, coder):
    (tmp_path / "bad.slim").write_bytes(slim_v2_file(b"", [empty_entry(shape, coder)]))
    with pytest.raises(SlimFormatError, match="shape"):
        load_slim(tmp_path / "bad.slim")


@pytest.mark.parametrize("coder", ["raw", "eg", "rans"])
def test_an_empty_shape_with_dimensions_up_to_the_element_limit_loads(tmp_path, coder):
    shape = [2**24, 0, 2**24]  # the non-zero dimensions multiply to 2^48, the element limit
    (tmp_path / "e.slim").write_bytes(slim_v2_file(b"", [empty_entry(shape, coder)]))
    assert load_slim(tmp_path / "e.slim")["e"].shape == tuple(shape)


def rans_claim_file(path, numel: int, dtype: str = "float32", pad_nbytes: int = 0):
    """A file whose "rans" tensor 'w' holds ``numel`` zeros in one chunk, after a raw uint8 'pad' of pad_nbytes
    bytes. A one-symbol alphabet (frequency 2^S) leaves the rANS state unchanged, so the buffer has ~15 bytes for
    any count: a valid file that decodes to 2^k elements costs nothing."""
    one = ops.rans_encode(torch.zeros(1, dtype=torch.int32)).numpy().tobytes()
    buffer = one[:1] + varint(numel) + one[2:]  # mode byte, then the count in place of one[1] == varint(1)
    pad = {"name": "pad", "shape": [pad_nbytes], "dtype": "uint8", "coder": "raw", "step": None, "offset": 8,
           "nbytes": pad_nbytes, "crc32": zlib.crc32(bytes(pad_nbytes))}
    w = {"name": "w", "shape": [numel], "dtype": dtype, "coder": "rans", "step": STEP, "offset": 8 + pad_nbytes,
         "nbytes": len(buffer), "crc32": zlib.crc32(buffer), "chunk_numel": numel, "chunk_nbytes": [len(buffer)]}
    path.write_bytes(slim_v2_file(bytes(pad_nbytes) + buffer, [pad, w]))
    return path


def test_a_forged_rans_file_decodes_to_what_its_index_declares(tmp_path):
    path = rans_claim_file(tmp_path / "z.slim", 1000, "bfloat16", pad_nbytes=3)
    assert slim_index(path.read_bytes())[1]["tensors"][1]["nbytes"] < 20
    loaded = load_slim(path)
    assert torch.equal(loaded["w"], torch.zeros(1000, dtype=torch.bfloat16)) and loaded["pad"].tolist() == [0, 0, 0]


def test_a_declared_size_above_max_bytes_is_refused_before_decoding(tmp_path, monkeypatch):
    path = rans_claim_file(tmp_path / "bomb.slim", 2**20, pad_nbytes=5)  # 4 MiB of float32 + 5 bytes
    total = 4 * 2**20 + 5
    monkeypatch.setattr(ops, "slim_decode", lambda *args: pytest.fail("decoded before the size check"))
    for open_it in [lambda: SlimFile(path, max_bytes=total - 1), lambda: load_slim(path, max_bytes=total - 1),
                    lambda: load_slim_into(nn.Linear(2, 2), path, max_bytes=total - 1)]:
        with pytest.raises(SlimFormatError) as error:
            open_it()
        assert str(error.value).startswith(f"{path}: the index declares {total} bytes of decoded tensors (the "
                                           f"largest, 'w', claims {4 * 2**20} bytes), above the limit of "
                                           f"{total - 1} bytes (max_bytes)")
        assert "pass a larger max_bytes=" in str(error.value)
    monkeypatch.undo()
    for limit in [total, math.inf]:
        assert torch.equal(load_slim(path, max_bytes=limit)["w"], torch.zeros(2**20))


def test_the_default_max_bytes_is_1_gib_or_256_times_the_file_size(tmp_path):
    SlimFile(rans_claim_file(tmp_path / "a.slim", 2**28)).close()  # 1 GiB of float32: the floor
    with pytest.raises(SlimFormatError, match=r"above the limit of 1073741824 bytes \(the default, max\(1 GiB, "
                                              r"256 × the file's \d+ bytes\)\)"):
        SlimFile(rans_claim_file(tmp_path / "a.slim", 2**28 + 1))
    pad = 8 * 2**20  # an 8 MiB file: the default is 256 × its size, just over 2 GiB
    SlimFile(rans_claim_file(tmp_path / "b.slim", 3 * 2**27, pad_nbytes=pad)).close()  # 1.5 GiB + 8 MiB
    path = rans_claim_file(tmp_path / "b.slim", 2**29, pad_nbytes=pad)  # 2 GiB + 8 MiB
    with pytest.raises(SlimFormatError, match=f"256 × the file's {path.stat().st_size} bytes"):
        SlimFile(path)
    with pytest.raises(SlimFormatError, match="above the limit"):  # 2^40 float32: once an allocation failure
        load_slim(rans_claim_file(tmp_path / "c.slim", 2**40))


@pytest.mark.parametrize(("max_bytes", "error", "match"), [
    ("1GB", TypeError, "max_bytes: expected a number of bytes"), (True, TypeError, "got bool"),
    (-1, ValueError, "max_bytes: expected a number of bytes >= 0"), (float("nan"), ValueError, "nan"),
])
def test_max_bytes_rejects_bad_values(tmp_path, max_bytes, error, match):
    path = save_slim({"b": torch.randn(3)}, tmp_path / "m.slim", step={})
    with pytest.raises(error, match=match):
        SlimFile(path, max_bytes=max_bytes)
    with pytest.raises(error, match=match):
        load_slim(path, max_bytes=max_bytes)


def damaged_files(tmp_path) -> dict[str, bytes]:
    """A file's bytes damaged in each place a reader checks; every checksum but the damaged one is valid."""
    data = save_slim({"w": torch.randn(4, 5), "n": torch.tensor([True, False])}, tmp_path / "m.slim",
                     step={"w": STEP}, coder="rans").read_bytes()
    index_offset, index = slim_index(data)
    w, n = index["tensors"]
    corrupt_w = bytes([data[w["offset"]] ^ 1])  # the rANS mode byte: 0 → 1 (raw), the wrong size for raw
    bool_two = b"\x02\x00"
    return {
        "magic": b"MILS" + data[4:], "truncated": data[:-5], "padded": data + b"\x00",
        "index-checksum": data[:index_offset] + b" " + data[index_offset + 1:],
        "field": slim_v2_file(data[8:index_offset], [{**w, "dtype": ["float32"]}, n]),
        "payload-checksum": data[:w["offset"]] + corrupt_w + data[w["offset"] + 1:],
        "payload": slim_v2_file(corrupt_w + data[w["offset"] + 1:index_offset],
                                [{**w, "crc32": zlib.crc32(corrupt_w + data[9:n["offset"]])},
                                 {**n, "crc32": zlib.crc32(data[n["offset"]:index_offset])}]),
        "bool-byte": slim_v2_file(data[8:n["offset"]] + bool_two, [w, {**n, "crc32": zlib.crc32(bool_two)}]),
        "step-above-dtype-max": slim_v2_file(data[8:index_offset], [{**w, "dtype": "float16", "step": 1e5}, n]),
    }


@pytest.mark.parametrize("damage", ["magic", "truncated", "padded", "index-checksum", "field", "payload-checksum",
                                    "payload", "bool-byte", "step-above-dtype-max"])
def test_every_slim_format_error_names_the_file(tmp_path, damage):
    bad = tmp_path / "bad.slim"
    bad.write_bytes(damaged_files(tmp_path)[damage])
    with pytest.raises(SlimFormatError) as error:
        load_slim(bad)
    assert str(error.value).startswith(f"{bad}: ") and str(error.value).count(str(bad)) == 1, str(error.value)


def test_a_bool_byte_other_than_0_or_1_and_a_step_above_the_dtype_maximum_are_refused(tmp_path):
    bad = tmp_path / "bad.slim"
    bad.write_bytes(damaged_files(tmp_path)["bool-byte"])
    with pytest.raises(SlimFormatError, match="tensor 'n': a bool payload holds byte 2"):
        load_slim(bad)
    bad.write_bytes(damaged_files(tmp_path)["step-above-dtype-max"])  # every q ≠ 0 would decode to ±inf
    with pytest.raises(SlimFormatError, match="index tensor 'w': step 100000.0 is above float16's largest value"):
        load_slim(bad)


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_slim(tmp_path / "nope.slim")


def peak_rss_growth(run) -> int:
    """Bytes by which run() raised this process's peak RSS (Linux: /proc/self/clear_refs resets the peak)."""
    def peak_kib() -> int:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))

    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) becomes the current RSS
    start = peak_kib()
    run()
    return 1024 * (peak_kib() - start)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_decoding_holds_the_declared_size_plus_the_decoder_scratch(tmp_path):
    path = rans_claim_file(tmp_path / "z.slim", 2**24)  # 64 MiB of float32 from a file of a few hundred bytes
    loaded = {}
    growth = peak_rss_growth(lambda: loaded.update(load_slim(path)))
    declared, scratch = 4 * 2**24, 4 * 2**24  # the output, and the decoder's int32 symbols of the one chunk
    assert loaded["w"].numel() * loaded["w"].element_size() == declared
    assert growth < declared + scratch + 16 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB"

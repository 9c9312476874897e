"""The fuzzer's four case families. ``make_case(family, seed, index, files)`` is a pure function: case ``index`` of
``family`` under ``seed`` is always the same input, whatever else runs.

- "bytes": byte-level mutations of a seed file (bit flips, byte sets, insertions, deletions, truncations,
  splices) with the checksums left as they are: a load that succeeds must return the seed file's tensors.
- "header": edits of the index (version 2) or header (version 1) with its CRC recomputed: field values and
  types, shapes, offsets, sizes, chunk fields, steps, coders, extra/missing keys, duplicate names, the JSON
  structure and text (truncated, non-UTF-8, deeply nested). A load must refuse or return what the index says.
- "payload": edits of one tensor's payload with its CRC (and the index's) recomputed: bit flips, byte sets,
  resized chunks, rANS header fields, and element-count claims (a rANS stream of N equal symbols is a few
  bytes for any N). A load must refuse or return what the index says; trailing bytes and a stream holding
  more or fewer symbols than the shape must be refused.
- "stream": coder streams straight into ops.eg_decode / rans_decode / slim_decode, made by the encoders and then
  forged: bytes, counts up to 2^64, rANS modes and tables, layouts, steps, dtypes, argument types.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

from fuzz_slim_coders import HUGE, INF, NAN, STEPS, constant_rans, forge_rans, mutate_bytes, rans_fuzz_buf, stream_case
from fuzz_slim_files import Image, read_image, relayout, write_image

FAMILIES = ("bytes", "header", "payload", "stream")
SLIM_FAMILIES = FAMILIES[:3]
WEIRD = [None, True, False, -1, 0, 1, *HUGE, -2**63, 1.5, -0.0, NAN, INF, -INF, 5e-324, 1e308, "", "float32",
         "x" * 300, [], [1], [[1]], {}, {"a": 1}]
DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool", "float8_e4m3fn",
          "complex64", "uint16", "Float32", ["float32"], {"float32": 1}, 4, None]
CODERS = ["raw", "eg", "eg-signed", "rans", "zstd", "", None, 1, ["rans"]]


@dataclass
class Case:
    family: str
    index: int
    seed: int
    origin: str  # the seed file mutated, or the op called
    data: bytes  # a .slim file, or the op call as JSON ("stream")
    must_refuse: bool = False  # the input breaks a rule the format requires a reader to detect
    type_edit: bool = False  # "stream": an argument of the wrong type, so a TypeError is the documented answer
    expect: list | None = None  # "stream": the symbols an unforged call must return


def make_case(family: str, seed: int, index: int, files: dict[str, bytes]) -> Case:
    rng = random.Random(f"{seed}/{family}/{index}")  # str seeds hash with SHA-512: the same in every process
    case = Case(family, index, seed, "", b"")
    GENERATORS[family](rng, files, case)
    return case


# ---- bytes ----------------------------------------------------------------------------------------

def _bytes_case(rng, files, case):
    case.origin = rng.choice(sorted(files))
    data = bytearray(files[case.origin])
    for _ in range(rng.choice([1, 1, 2, 3])):
        mutate_bytes(rng, data, files[rng.choice(sorted(files))])
    case.data = bytes(data)


# ---- header ---------------------------------------------------------------------------------------

def _entry(rng, doc):
    entries = doc.get("tensors") if isinstance(doc, dict) else None
    if isinstance(entries, list) and entries and isinstance(entries[-1], dict):
        return rng.choice([e for e in entries if isinstance(e, dict)])
    return None


def _edit_entry(rng, doc):
    e = _entry(rng, doc)
    if e is None:
        return doc
    shape = e.get("shape") if isinstance(e.get("shape"), list) else [1]
    numel = math.prod(d for d in shape if type(d) is int)
    key, value = rng.choice([
        ("shape", rng.choice([[2**63, 0], [15, 2**62, 0], [0, 2**64], [2**24, 2**24], [2**48], [2**48 + 1], [-1],
                              [1] * 64, [1] * 65, [], [1.0, 2], [True], [[3]], "3", shape[::-1], shape + [1],
                              [rng.choice(HUGE), *shape], [*shape, 2**63], [numel], [numel + 1],
                              [max(numel - 1, 0)]])),  # a huge dimension keeps an empty tensor empty
        ("dtype", rng.choice(DTYPES)), ("step", rng.choice(STEPS)), ("coder", rng.choice(CODERS)),
        (rng.choice([*e, "extra"]), rng.choice(WEIRD)),
        ("chunk_numel", rng.choice([1, 2, 15, 17, numel, numel + 1, 2**40, 2**63, 0, -1]))])
    e[key] = value
    return doc


def _sizes(entry: dict) -> list[int]:
    """The entry's chunk sizes when they are a list of ints (an earlier edit may have made them anything)."""
    sizes = entry.get("chunk_nbytes")
    return sizes if isinstance(sizes, list) and all(type(n) is int for n in sizes) else []


def _tweak_int(rng, doc):
    """An integer field (offset, sizes, checksum, chunk fields) moved by a little or a lot."""
    e = _entry(rng, doc) or {}
    ints = [k for k in e if type(e[k]) is int] + (["chunk_nbytes"] if _sizes(e) else [])
    if not ints:
        return doc
    key = rng.choice(ints)
    target, at = (e["chunk_nbytes"], rng.randrange(len(e["chunk_nbytes"]))) if key == "chunk_nbytes" else (e, key)
    v = target[at]
    target[at] = rng.choice([v + 1, v - 1, 0, 2 * v, v + 2**32, -v, 2**63, v ^ 1])
    return doc


def _edit_list(rng, doc):
    """Duplicate names or entries, drop, swap or split chunk sizes, drop a key."""
    entries, e = doc.get("tensors") if isinstance(doc, dict) else None, _entry(rng, doc)
    if e is None:
        return doc
    kind = rng.randrange(5)
    if kind == 0:
        _entry(rng, doc)["name"] = e.get("name")
    elif kind == 1:
        entries.insert(rng.randrange(len(entries) + 1), copy.deepcopy(e))
    elif kind == 2:
        entries.remove(e)
    elif kind == 3 and _sizes(e):
        sizes = e["chunk_nbytes"]
        e["chunk_nbytes"] = rng.choice([sizes[::-1], sizes + [0], sizes[:-1], [sum(sizes)], sizes * 2])
    elif e:
        e.pop(rng.choice(list(e)))
    return doc


def _edit_structure(rng, doc):
    which = rng.randrange(3)
    if which == 0:
        return rng.choice([[], [doc], None, 1, "x", {}, {"tensors": doc.get("tensors")}])
    if which == 1:
        doc["tensors"] = rng.choice([None, {}, "x", [1], [[]], [None], [{}], [{"name": 1}]])
    else:
        doc["metadata"] = rng.choice([None, [], {"a": 1}, {"a": None}, "x", {"": ""}, {"k" * 1000: "v"}])
    return doc


def _text_edit(rng):
    """A function of the serialized index: truncated, garbage, non-UTF-8, deeply nested, digits changed."""
    nest, cut, spaces = rng.choice([10, 1000, 100000]), rng.random(), rng.randrange(3)
    deep, digits = b"[" * nest + b"]" * nest, rng.choice([b"9", b"11", b"-1", b"1e400", b"1.0"])
    edits = [lambda t: t[:int(cut * len(t))], lambda t: b"", lambda t: b"\xef\xbb\xbf" + t,
             lambda t: t.replace(b'"', b"\xff", 1), lambda t: t.replace(b'"name"', b'"n\xc3me"', 1),
             lambda t: b'{"deep":' + deep + b"," + t[1:],
             lambda t: t.replace(b'{"name"', b'{"deep":' + deep + b',"name"', 1),
             lambda t: t.replace(b"1", digits, 1), lambda t: t.replace(b'{"name"', b'{"name":"dup","name"', 1),
             lambda t: t + b" " * spaces]
    return rng.choice(edits)


def _header_case(rng, files, case):
    case.origin = rng.choice(sorted(files))
    image = read_image(files[case.origin])  # a fresh parse: its entries can be edited in place
    doc = {"tensors": image.entries}
    if image.version == 2:
        doc["metadata"] = dict(image.metadata)
    for _ in range(rng.choice([1, 1, 2, 3])):
        if isinstance(doc, dict):  # until a structure edit made it something else
            doc = rng.choice([_edit_entry, _edit_entry, _tweak_int, _edit_list, _edit_structure])(rng, doc)
    case.data = write_image(image, doc, _text_edit(rng) if rng.random() < 0.15 else None)


# ---- payload --------------------------------------------------------------------------------------

def _sections(entry: dict) -> list[tuple[str, int]]:
    """(layout field, size) of the payload's parts in order: the "eg" table, then each chunk."""
    table = [("table_nbytes", entry["table_nbytes"])] if entry["coder"] == "eg" else []
    chunks = entry.get("chunk_nbytes", [entry["nbytes"] - entry.get("table_nbytes", 0)] if entry["nbytes"] else [])
    return table + [(i, n) for i, n in enumerate(chunks)]


def _resize_section(rng, entry, payload: bytes, append: bool) -> bytes:
    """Bytes inserted into, deleted from or (append) added at the end of one part, its size field updated."""
    sections = _sections(entry)
    s = rng.randrange(len(sections))
    start = sum(n for _, n in sections[:s])
    key, size = sections[s]
    if append:
        at, new = start + size, bytes([rng.choice([0, rng.randrange(256)])]) * rng.randrange(1, 4)
        payload, delta = payload[:at] + new + payload[at:], len(new)
    elif rng.random() < 0.5 and size:
        at = start + rng.randrange(size)
        delta = -min(rng.randint(1, 4), start + size - at)
        payload = payload[:at] + payload[at - delta:]
    else:
        at, delta = start + rng.randint(0, size), rng.randint(1, 4)
        payload = payload[:at] + bytes(rng.randrange(256) for _ in range(delta)) + payload[at:]
    if key == "table_nbytes":
        entry["table_nbytes"] += delta
    elif "chunk_nbytes" in entry and rng.random() < 0.9:
        entry["chunk_nbytes"][key] += delta
    return payload


def _claim(rng, entry: dict, payload: bytes) -> bytes:
    """The tensor re-declared as N = 2^k elements in one chunk: for "rans", a valid stream of N equal symbols or
    a stream whose count was changed to N; for "eg"/"eg-signed", the payload as it was."""
    n = 2 ** rng.randint(12, 48)
    entry.update(shape=[n], **({"chunk_numel": n} if "chunk_numel" in entry else {}))
    if entry["coder"] == "rans":
        payload = constant_rans(n, rng.choice([0, 1, -3])) if rng.random() < 0.5 else \
            forge_rans(rng, constant_rans(3) if rng.random() < 0.3 else rans_fuzz_buf(rng), n)[0]
    if "chunk_nbytes" in entry:
        entry["chunk_nbytes"] = [len(payload) - entry.get("table_nbytes", 0)]
    return payload


def _payload_case(rng, files, case):
    case.origin = rng.choice(sorted(files))
    image = read_image(files[case.origin])
    entries = image.entries
    payloads = [image.payload(e) for e in entries]
    i = rng.choice([i for i, e in enumerate(entries) if e["nbytes"]])
    entry, payload = entries[i], bytearray(payloads[i])
    coded = entry["coder"] != "raw"
    kind = rng.choice(["flip", "flip", "resize", "trailing", "count", "rans", "claim"])
    if kind == "resize" and coded:
        payloads[i] = _resize_section(rng, entry, bytes(payload), append=False)
    elif kind == "trailing" and coded:
        payloads[i], case.must_refuse = _resize_section(rng, entry, bytes(payload), append=True), True
    elif kind == "count":
        numel = math.prod(entry["shape"])
        entry["shape"], case.must_refuse = [max(0, numel + rng.choice([-3, -2, -1, 1, 2, 3]))], True
    elif kind == "rans" and entry["coder"] == "rans":
        sizes = entry.get("chunk_nbytes", [entry["nbytes"]])  # version 1: one chunk
        c = rng.randrange(len(sizes))
        start, end = sum(sizes[:c]), sum(sizes[:c + 1])
        chunk, case.must_refuse = forge_rans(rng, bytes(payload[start:end]))
        payloads[i] = bytes(payload[:start]) + chunk + bytes(payload[end:])
        sizes[c] = len(chunk)
    elif kind == "claim" and coded:
        payloads[i] = _claim(rng, entry, bytes(payload))
    else:
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(payload))
            payload[at] = payload[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.7 else rng.randrange(256)
        payloads[i] = bytes(payload)
    case.data = write_image(relayout(Image(image.version, entries, b"", image.metadata), payloads))


GENERATORS = {"bytes": _bytes_case, "header": _header_case, "payload": _payload_case, "stream": stream_case}

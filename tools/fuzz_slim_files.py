"""The fuzzer's seed .slim files, and a small independent reader/writer of their layout (docs/slim-format.md §2,
§11) so that mutated files can be written back with valid checksums.

An ``Image`` is a file taken apart: its version, its index entries (offsets relative to the first payload
byte), the payload bytes and (version 2) the metadata. ``write_image`` lays it out again: version 2 puts the
index after the payloads and recomputes the trailer's CRC; version 1 recomputes the header CRC and shifts the
integer offsets by the header's length, iterating until that length is stable as the version-1 writer did.
"""

from __future__ import annotations

import json
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

V2_START, V1_PREFIX = 8, 20  # bytes before the payloads: magic + version (+ header size and CRC in version 1)
TRAILER = struct.Struct("<QQI4s")  # index_offset, index_nbytes, index_crc32, magic
CHUNK_NUMEL = 16  # small, so that seed tensors of a few dozen elements have several chunks
CODERS = ("raw", "eg", "eg-signed", "rans")


@dataclass
class Image:
    version: int
    entries: list = field(default_factory=list)  # index entries, "offset" relative to the payloads' start
    payloads: bytes = b""
    metadata: dict = field(default_factory=dict)

    def payload(self, entry: dict) -> bytes:
        return self.payloads[entry["offset"]:entry["offset"] + entry["nbytes"]]


def read_image(data: bytes) -> Image:
    """A well-formed seed file taken apart (no checks: the fuzzer only parses files it wrote)."""
    version = struct.unpack_from("<I", data, 4)[0]
    if version == 1:
        header_nbytes = struct.unpack_from("<Q", data, 8)[0]
        start = V1_PREFIX + header_nbytes
        doc, payloads = json.loads(data[V1_PREFIX:start]), data[start:]
    else:
        index_offset, index_nbytes, _, _ = TRAILER.unpack_from(data, len(data) - TRAILER.size)
        start, payloads = V2_START, data[V2_START:index_offset]
        doc = json.loads(data[index_offset:index_offset + index_nbytes])
    entries = [{**e, "offset": e["offset"] - start} for e in doc["tensors"]]
    return Image(version, entries, payloads, doc.get("metadata", {}))


def _shifted(doc, base: int):
    """doc with ``base`` added to every integer "offset" of its entries (forged offsets of other types kept)."""
    if not (isinstance(doc, dict) and isinstance(doc.get("tensors"), list)):
        return doc
    shift = [{**e, "offset": e["offset"] + base} if isinstance(e, dict) and type(e.get("offset")) is int else e
             for e in doc["tensors"]]
    return {**doc, "tensors": shift}


def index_text(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def write_image(image: Image, doc=None, text_edit=None) -> bytes:
    """The file of ``image`` (or of the index object ``doc``, any JSON value), with valid checksums; ``text_edit``
    maps the serialized index bytes to other bytes (not necessarily JSON) before the checksum is computed."""
    if doc is None:
        doc = {"tensors": image.entries, "metadata": image.metadata} if image.version == 2 else \
            {"tensors": image.entries}
    edit = text_edit or (lambda text: text)
    if image.version == 2:
        index = edit(index_text(_shifted(doc, V2_START)))
        checked = struct.pack("<QQ", V2_START + len(image.payloads), len(index))
        return (b"SLIM" + struct.pack("<I", 2) + image.payloads + index + checked
                + struct.pack("<I4s", zlib.crc32(checked, zlib.crc32(index)), b"SLIM"))
    header, previous = b"", None
    for _ in range(8):  # offsets are written in decimal: their digits depend on the header's length
        if len(header) == previous:
            break
        previous = len(header)
        header = edit(index_text(_shifted(doc, V1_PREFIX + previous)))
    start = struct.pack("<4sIQ", b"SLIM", 1, len(header))
    return start + struct.pack("<I", zlib.crc32(header, zlib.crc32(start))) + header + image.payloads


def relayout(image: Image, payloads: list[bytes]) -> Image:
    """``image`` with these payloads (one per entry), back to back, their nbytes and CRCs recomputed."""
    entries, offset = [], 0
    for entry, payload in zip(image.entries, payloads, strict=True):
        entries.append({**entry, "offset": offset, "nbytes": len(payload), "crc32": zlib.crc32(payload)})
        offset += len(payload)
    return Image(image.version, entries, b"".join(payloads), image.metadata)


def _seed_state(coder: str) -> dict:
    """A few dozen values per dtype: every float dtype (quantized unless coder is "raw"), a multi-chunk and an
    empty float tensor, and lossless int64, int16, uint8 and bool tensors."""
    import torch

    g = torch.Generator().manual_seed(0)
    floats = {"w32": torch.randn(5, 7, generator=g), "w16": torch.randn(3, 4, generator=g).half(),
              "wbf": torch.randn(4, 3, generator=g).bfloat16(), "w64": torch.randn(2, 5, generator=g).double(),
              "long": torch.randn(3, 17, generator=g), "scalar": torch.randn((), generator=g),
              "empty": torch.empty(0, 3)}
    ints = {"i64": torch.randint(-2**40, 2**40, (3,), generator=g),
            "i16": torch.randint(-300, 300, (2, 2), generator=g).short(),
            "u8": torch.randint(0, 256, (5,), generator=g).byte(), "mask": torch.rand(2, 3, generator=g) > 0.5}
    return {**{n: (t, None if coder == "raw" else 0.05) for n, t in floats.items()},
            **{n: (t, None) for n, t in ints.items()}}


def seed_files() -> dict[str, bytes]:
    """name → bytes of the seed files: "v2-<coder>" (chunks of CHUNK_NUMEL symbols) and "v1-<coder>" for each
    coder; the same tensors, and the same bytes for every run."""
    from slimrate import SlimWriter

    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for coder in CODERS:
            for chunk_numel in (CHUNK_NUMEL, None):  # None: one chunk per tensor, the payloads of version 1
                path = Path(tmp) / f"{coder}-{chunk_numel}.slim"
                with SlimWriter(path, chunk_numel=chunk_numel, metadata={"source": "fuzz"}) as w:
                    for name, (t, step) in _seed_state(coder).items():
                        w.add(name, t, step=step, coder="eg" if coder == "raw" else coder)
                files[f"v2-{coder}" if chunk_numel else f"v1-{coder}"] = path.read_bytes()
    for name in [n for n in files if n.startswith("v1-")]:
        image = read_image(files[name])
        entries = [{k: v for k, v in e.items() if not k.startswith("chunk_")} for e in image.entries]
        files[name] = write_image(Image(1, entries, image.payloads))
    return files

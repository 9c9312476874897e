"""The .slim byte layout (docs/slim-format.md) and the checks an index passes before anything is decoded.

Version 2 (written), all integers little-endian:

    offset 0      b"SLIM", uint32 version = 2                                   (8 bytes)
    8             payloads, back to back in index order (written as each tensor is encoded)
    I             index JSON, UTF-8: {"tensors": [entry, ...], "metadata": {str: str}}
    end − 24      trailer: uint64 I, uint64 index_nbytes, uint32 index_crc32, b"SLIM"
                  index_crc32 = zlib.crc32(index JSON + the 16 trailer bytes before it)

Version 1 (read only): b"SLIM", uint32 1, uint64 H, uint32 zlib.crc32(bytes [0, 16) + header), the header
JSON {"tensors": [entry, ...]} (H bytes), then the payloads up to the end of the file.

entry = {"name", "shape", "dtype", "coder", "step", "offset" (absolute), "nbytes", "crc32" (of the payload)},
plus "table_count", "table_nbytes" for "eg", plus (version 2) "chunk_numel", "chunk_nbytes" for the entropy
coders. A version-1 entry is read as the single-chunk case, so one decoder serves both versions.
Reading checks magic, version, checksum, every field's type and range, that the payloads tile their region
exactly and that the chunk sizes and symbol counts fit the payload, so a truncated or corrupt file raises
SlimFormatError (a ValueError) before any size taken from the file is allocated.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import torch

from slimrate.backslash.slim_coding import CODERS, QUANTIZABLE_DTYPES, RAW_DTYPES, SlimFormatError

MAGIC = b"SLIM"
FORMAT_VERSION = 2
START = struct.Struct("<4sI")  # magic, version: both versions
V1_HEADER = struct.Struct("<QI")  # after START: header_nbytes, header_crc32 (of bytes [0, 16) + header)
TRAILER = struct.Struct("<QQI4s")  # index_offset, index_nbytes, index_crc32, magic
TRAILER_CHECKED = 16  # index_offset, index_nbytes: covered by index_crc32
MAX_DIMS = 64
MAX_NUMEL = 2**48  # far above any real tensor; keeps a forged shape from reaching an allocation
MAX_CHUNK_NUMEL = 2**63 - 1  # the largest the writer takes (ops.slim_encode's int64 chunk_numel)
ENTRY_KEYS = {"name", "shape", "dtype", "coder", "step", "offset", "nbytes", "crc32"}
EG_KEYS = {"table_count", "table_nbytes"}
CHUNK_KEYS = {"chunk_numel", "chunk_nbytes"}
V1_EMPTY_RANS_NBYTES = 8  # version 1 wrote a "rans" buffer of no symbols for an empty tensor


def start_bytes() -> bytes:
    """The first 8 bytes of a version-2 file."""
    return START.pack(MAGIC, FORMAT_VERSION)


def index_bytes(entries: list[dict], metadata: dict[str, str], index_offset: int) -> bytes:
    """Index JSON + trailer: the end of a version-2 file whose index starts at byte ``index_offset``."""
    index = json.dumps({"tensors": entries, "metadata": metadata}, separators=(",", ":")).encode()
    checked = struct.pack("<QQ", index_offset, len(index))
    return index + checked + struct.pack("<I4s", zlib.crc32(checked, zlib.crc32(index)), MAGIC)


def read_index(data: memoryview) -> tuple[list[dict], dict[str, str]]:
    """(entries, metadata) of a whole .slim file's bytes, validated; entries carry the chunk fields in both
    versions (version 1: one chunk, metadata {})."""
    if len(data) < START.size:
        raise SlimFormatError(f"not a .slim file: {len(data)} bytes, shorter than the {START.size}-byte start")
    magic, version = START.unpack_from(data)
    if magic != MAGIC:
        raise SlimFormatError(f"not a .slim file: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version == 1:
        return _read_v1(data), {}
    if version == FORMAT_VERSION:
        return _read_v2(data)
    raise SlimFormatError(f"unsupported .slim version {version}; this slimrate reads versions 1 and {FORMAT_VERSION}")


def _read_v2(data: memoryview) -> tuple[list[dict], dict[str, str]]:
    size = len(data)
    if size < START.size + TRAILER.size:
        raise SlimFormatError(f"truncated: {size} bytes, a version-2 file has at least {START.size + TRAILER.size}")
    index_offset, index_nbytes, index_crc, magic = TRAILER.unpack_from(data, size - TRAILER.size)
    if magic != MAGIC:
        raise SlimFormatError(f"truncated or corrupt: the file ends with {bytes(magic)!r}, not the trailer's {MAGIC!r}")
    if index_offset < START.size or index_offset + index_nbytes != size - TRAILER.size:
        raise SlimFormatError(f"truncated or corrupt: an index of {index_nbytes} bytes at byte {index_offset} does "
                              f"not end where the trailer starts (byte {size - TRAILER.size})")
    index = bytes(data[index_offset:index_offset + index_nbytes])
    checked = data[size - TRAILER.size:size - TRAILER.size + TRAILER_CHECKED]
    if zlib.crc32(checked, zlib.crc32(index)) != index_crc:
        raise SlimFormatError("index checksum mismatch: the file is corrupt")
    parsed = _parse_json(index, "index")
    metadata = parsed.get("metadata")
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise SlimFormatError("malformed index: 'metadata' is not an object of strings")
    entries = [_check_entry(entry, i, 2) for i, entry in enumerate(_tensor_list(parsed, "index"))]
    _check_tiling(entries, START.size, index_offset, "the index starts")
    return entries, metadata


def _read_v1(data: memoryview) -> list[dict]:
    prefix = START.size + V1_HEADER.size
    if len(data) < prefix:
        raise SlimFormatError(f"truncated: {len(data)} bytes, shorter than the {prefix}-byte version-1 prefix")
    header_nbytes, header_crc = V1_HEADER.unpack_from(data, START.size)
    if header_nbytes > len(data) - prefix:
        raise SlimFormatError(f"truncated: header of {header_nbytes} bytes, file has {len(data)} bytes")
    header = bytes(data[prefix:prefix + header_nbytes])
    if zlib.crc32(header, zlib.crc32(data[:prefix - 4])) != header_crc:
        raise SlimFormatError("header checksum mismatch: the file is corrupt")
    parsed = _parse_json(header, "header")
    entries = [_check_entry(entry, i, 1) for i, entry in enumerate(_tensor_list(parsed, "header"))]
    _check_tiling(entries, prefix + header_nbytes, len(data), "the file ends")
    return entries


def _parse_json(text: bytes, what: str) -> dict:
    try:
        parsed = json.loads(text.decode())
    except (ValueError, RecursionError) as e:  # RecursionError: a forged, deeply nested index
        raise SlimFormatError(f"malformed {what}: {e}") from None
    if not isinstance(parsed, dict):
        raise SlimFormatError(f"malformed {what}: expected a JSON object, got {type(parsed).__name__}")
    return parsed


def _tensor_list(parsed: dict, what: str) -> list:
    if not isinstance(parsed.get("tensors"), list):
        raise SlimFormatError(f"malformed {what}: 'tensors' is not a list")
    return parsed["tensors"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(entry: object, index: int, version: int) -> dict:
    """Every field's type (checked before the value is used as a key, compared or multiplied) and range; a
    version-1 entry gets its single chunk's fields."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise SlimFormatError(f"index tensor #{index}: expected an object with a str name")
    where = f"index tensor {entry['name']!r:.200}"
    coder = entry.get("coder")
    if not (isinstance(coder, str) and coder in ("raw", *CODERS)):
        raise SlimFormatError(f"{where}: unknown coder {coder!r:.80}")
    keys = ENTRY_KEYS | (EG_KEYS if coder == "eg" else set()) | (CHUNK_KEYS if version > 1 and coder in CODERS
                                                                  else set())
    if set(entry) != keys:
        raise SlimFormatError(f"{where}: fields {sorted(entry)}, expected {sorted(keys)}")
    dtype = entry["dtype"]
    if not (isinstance(dtype, str) and dtype in RAW_DTYPES):
        raise SlimFormatError(f"{where}: unknown dtype {dtype!r:.80}")
    if not all(_is_int(entry[key]) and entry[key] >= 0 for key in ("offset", "nbytes", "crc32", *EG_KEYS & keys)):
        raise SlimFormatError(f"{where}: offset, sizes and checksum must be integers >= 0")
    numel = _numel(entry["shape"], where)
    step = entry["step"]
    if coder == "raw":
        if step is not None or entry["nbytes"] != numel * RAW_DTYPES[dtype].itemsize:
            raise SlimFormatError(f"{where}: raw payload of {entry['nbytes']} bytes does not match "
                                  f"shape {entry['shape']} × {dtype}")
        return entry
    if not (dtype in QUANTIZABLE_DTYPES and isinstance(step, float) and math.isfinite(step) and step > 0):
        raise SlimFormatError(f"{where}: quantized tensors need a float dtype and a step > 0, got "
                              f"{dtype}, {step!r:.80}")
    if step > torch.finfo(RAW_DTYPES[dtype]).max:  # then every q ≠ 0 decodes to ±inf
        raise SlimFormatError(f"{where}: step {step!r} is above {dtype}'s largest value "
                              f"{torch.finfo(RAW_DTYPES[dtype]).max!r}")
    if version == 1:  # one chunk
        table_nbytes = entry.get("table_nbytes", 0)
        if table_nbytes > entry["nbytes"]:
            raise SlimFormatError(f"{where}: a table of {table_nbytes} bytes in a payload of {entry['nbytes']}")
        if numel == 0 and entry["nbytes"] not in (0, V1_EMPTY_RANS_NBYTES if coder == "rans" else 0):
            raise SlimFormatError(f"{where}: an empty tensor with a payload of {entry['nbytes']} bytes; version 1 "
                                  f"wrote none (8 for an empty rans tensor)")
        entry.update(chunk_numel=max(numel, 1), chunk_nbytes=[entry["nbytes"] - table_nbytes] if numel else [])
    _check_chunks(entry, numel, where, version)
    return entry


def _numel(shape: object, where: str) -> int:
    """The element count of a shape: a list of at most MAX_DIMS ints ≥ 0, each ≤ MAX_NUMEL, whose non-zero dims
    multiply to ≤ MAX_NUMEL (so an empty shape like [2**63, 0] never reaches torch either)."""
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(_is_int(d) and 0 <= d <= MAX_NUMEL for d in shape)):
        raise SlimFormatError(f"{where}: bad shape {shape!r:.200}: expected a list of at most {MAX_DIMS} ints in "
                              f"[0, {MAX_NUMEL}]")
    if math.prod(d for d in shape if d) > MAX_NUMEL:
        raise SlimFormatError(f"{where}: shape {shape} has more than {MAX_NUMEL} elements")
    return math.prod(shape)


def _check_chunks(entry: dict, numel: int, where: str, version: int) -> None:
    """Chunk sizes tile the payload after the table; counts an EG0 code cannot hold in its bytes are refused
    (≥ 1 bit per symbol). rANS codes a very skewed chunk in < 1 bit per symbol, so for "rans" only the index
    checksum and each chunk's own count vouch for the shape."""
    chunk_numel, chunk_nbytes, coder = entry["chunk_numel"], entry["chunk_nbytes"], entry["coder"]
    if not (_is_int(chunk_numel) and 1 <= chunk_numel <= MAX_CHUNK_NUMEL):
        raise SlimFormatError(f"{where}: chunk_numel {chunk_numel!r:.80}, expected an int in [1, {MAX_CHUNK_NUMEL}]")
    if not (isinstance(chunk_nbytes, list) and all(_is_int(n) and n >= 0 for n in chunk_nbytes)):
        raise SlimFormatError(f"{where}: chunk_nbytes must be a list of integers >= 0")
    n_chunks = -(-numel // chunk_numel)
    if len(chunk_nbytes) != n_chunks:
        raise SlimFormatError(f"{where}: {len(chunk_nbytes)} chunk sizes, but {numel} elements in chunks of "
                              f"{chunk_numel} make {n_chunks}")
    table_count, table_nbytes = entry.get("table_count", 0), entry.get("table_nbytes", 0)
    if version > 1 and table_nbytes + sum(chunk_nbytes) != entry["nbytes"]:
        raise SlimFormatError(f"{where}: table ({table_nbytes} bytes) and chunks ({sum(chunk_nbytes)} bytes) do not "
                              f"add up to the payload's {entry['nbytes']} bytes")
    if coder == "eg" and not (table_count <= min(numel, 8 * table_nbytes) and (table_count > 0 or numel == 0)):
        raise SlimFormatError(f"{where}: a table of {table_count} symbols in {table_nbytes} bytes does not fit "
                              f"{numel} symbols")
    if coder != "rans":
        for c, nbytes in enumerate(chunk_nbytes):
            if min(chunk_numel, numel - c * chunk_numel) > 8 * nbytes:
                raise SlimFormatError(f"{where}: chunk {c} cannot hold its symbols in {nbytes} bytes")


def _check_tiling(entries: list[dict], start: int, end: int, what_ends: str) -> None:
    """Names are unique and the payloads lie back to back from ``start`` exactly to ``end``."""
    offset, names = start, set()
    for entry in entries:
        if entry["name"] in names:
            raise SlimFormatError(f"index tensor {entry['name']!r}: a duplicate name")
        if entry["offset"] != offset:
            raise SlimFormatError(f"index tensor {entry['name']!r}: payload at byte {entry['offset']}, expected "
                                  f"{offset} (payloads are back to back)")
        names.add(entry["name"])
        offset += entry["nbytes"]
    if offset != end:
        raise SlimFormatError(f"payloads end at byte {offset}, but {what_ends} at byte {end}: truncated or padded")

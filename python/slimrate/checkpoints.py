"""Hugging Face safetensors checkpoints, one tensor at a time: read a file, a model folder or a sharded folder
(model-0000k-of-0000n.safetensors + model.safetensors.index.json); write one file or a folder in the layout that
transformers' ``from_pretrained`` loads, holding one tensor in memory at a time, not a shard; and carry a model
folder's small files (config, tokenizer) as text, for the .slim file's metadata key "slimrate.files".

The safetensors layout (huggingface/safetensors, README "Format"): a uint64 little-endian N, an N-byte UTF-8 JSON
header ``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces), then the tensors' bytes, C order, little-endian; offsets count from the end of the header
and tile the data exactly, without holes.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from slimrate.files import StagedWrites, write_bytes_atomic

# The codes of the dtypes safetensors.torch reads and writes (safetensors.torch._TYPES).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
METADATA_KEY = "__metadata__"  # the header key of the file's metadata, so no tensor may have this name
MAX_COUNT = 2**63 - 1  # the largest dimension or offset: torch sizes are int64
MAX_HEADER_NBYTES = 100_000_000  # safetensors refuses larger headers (MAX_HEADER_SIZE in its Rust crate)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MODEL_FILES_KEY = "slimrate.files"  # the .slim metadata key that holds a model folder's small files
MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # configs, tokenizer files, chat templates
MAX_MODEL_FILE_NBYTES = 16 * 2**20
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}
PICKLE_FIX = ("pickle checkpoints are not read (loading one can run arbitrary code); convert it to safetensors "
              "first: safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')")

Source = str | os.PathLike | Sequence[str | os.PathLike]


class Header(NamedTuple):
    """A safetensors file's checked header: tensors name → {"dtype", "shape", "data_offsets"} in data order."""
    tensors: dict[str, dict]
    metadata: dict[str, str]


def _header_error(file: Path, reason: str) -> ValueError:
    return ValueError(f"{file}: not a valid safetensors file ({reason})")


def _is_count(value: object) -> bool:
    """An int in [0, 2^63): a dimension torch can hold (int64), also when another dimension is 0."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def safetensors_header(file: Path) -> Header:
    """The header of the safetensors file ``file``, checked as safetensors checks it (dtypes, shapes that torch can
    hold, offsets that tile the data, the file's length) before anything is allocated, so that ``safe_open`` then
    reads it; ValueError naming the file otherwise."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _header_error(file, f"{size} bytes, shorter than the 8-byte header length")
        (header_nbytes,) = struct.unpack("<Q", prefix)
        if header_nbytes > min(size - 8, MAX_HEADER_NBYTES):
            raise _header_error(file, f"a header of {header_nbytes} bytes, the file has {size} bytes")
        try:
            header = json.loads(f.read(header_nbytes).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # RecursionError: a forged, deeply nested header
            raise _header_error(file, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _header_error(file, "the header is not a JSON object")
    metadata = header.pop(METADATA_KEY, {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _header_error(file, f"{METADATA_KEY} is not an object of strings")
    for name, entry in header.items():
        if not (isinstance(entry, dict) and entry.keys() == {"dtype", "shape", "data_offsets"}
                and isinstance(entry["dtype"], str) and entry["dtype"] in SAFETENSORS_DTYPES
                and isinstance(entry["shape"], list)
                and all(_is_count(d) for d in entry["shape"]) and isinstance(entry["data_offsets"], list)
                and len(entry["data_offsets"]) == 2 and all(_is_count(o) for o in entry["data_offsets"])):
            raise _header_error(file, f"tensor {name!r}: expected dtype, shape and data_offsets, got {entry!r:.200}")
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize:
            raise _header_error(file, f"tensor {name!r}: data_offsets {entry['data_offsets']} do not hold "
                                      f"{entry['shape']} × {entry['dtype']}")
    tensors = dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    data_nbytes = 0
    for name, entry in tensors.items():
        if entry["data_offsets"][0] != data_nbytes:
            raise _header_error(file, f"tensor {name!r} starts at data offset {entry['data_offsets'][0]}, expected "
                                      f"{data_nbytes}: tensors overlap or leave a hole")
        data_nbytes = entry["data_offsets"][1]
    expected = 8 + header_nbytes + data_nbytes
    if size < expected:
        raise ValueError(f"{file}: truncated: its header describes {expected} bytes, the file has {size}; "
                         "copy or download it again")
    if size > expected:
        raise _header_error(file, f"{size - expected} bytes after the last tensor's data")
    return Header(tensors, metadata)


def _relative_name(name: object) -> bool:
    """A file name an index may give: relative, inside its folder (transformers' own rule)."""
    return isinstance(name, str) and bool(name) and not Path(name).anchor and ".." not in Path(name).parts


def _index_headers(index: Path) -> dict[Path, Header]:
    """The shards an index names, each checked to hold exactly the tensors the index maps to it."""
    try:
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); expected "
                         '{"weight_map": {tensor name: shard file}}') from None
    if not isinstance(weight_map, dict) or not all(_relative_name(f) for f in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to shard files inside {index.parent}")
    shard_names: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        shard_names.setdefault(shard, set()).add(name)
    headers = {}
    for shard, names in sorted(shard_names.items()):
        file = index.parent / shard
        if not file.is_file():
            raise ValueError(f"{file}: missing; {index.name} names it for {len(names)} tensors "
                             f"({min(names)!r}, ...); copy or download it again")
        headers[file] = header = safetensors_header(file)
        missing, unlisted = sorted(names - header.tensors.keys()), sorted(header.tensors.keys() - names)
        if missing:
            raise ValueError(f"{index}: names tensor {missing[0]!r} in {shard}, which does not hold it "
                             f"({len(missing)} such tensors); the index and its shards do not match")
        if unlisted:
            raise ValueError(f"{file}: holds tensor {unlisted[0]!r}, which {index.name} does not list for it "
                             f"({len(unlisted)} such tensors); the index and its shards do not match")
    return headers


def _source_headers(path: Path) -> dict[Path, Header]:
    if path.is_dir():  # in from_pretrained's order of preference
        if (path / SINGLE_FILE).is_file():
            return {path / SINGLE_FILE: safetensors_header(path / SINGLE_FILE)}
        if (path / INDEX_FILE).is_file():
            return _index_headers(path / INDEX_FILE)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise ValueError(f"{path}: no .safetensors files in the folder" +
                             (f"; {pickles[0]}: {PICKLE_FIX}" if pickles else ""))
        return {file: safetensors_header(file) for file in files}
    if path.name.endswith(".safetensors.index.json"):
        return _index_headers(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: {PICKLE_FIX}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder (expected a .safetensors file or a model folder)")
    return {path: safetensors_header(path)}


def _checkpoint_headers(src: Source) -> dict[Path, Header]:
    """file → header for every safetensors file of ``src``, in reading order (see checkpoint_files)."""
    sources = [src] if isinstance(src, (str, os.PathLike)) else src
    if not isinstance(sources, Sequence) or not all(isinstance(s, (str, os.PathLike)) for s in sources):
        raise TypeError(f"src: expected a path or a list of paths, got {src!r}")
    headers: dict[Path, Header] = {}
    owners: dict[str, Path] = {}  # tensor name → the file holding it
    for source in sources:
        for file, header in _source_headers(Path(source)).items():
            if any(file.resolve() == seen.resolve() for seen in headers):
                raise ValueError(f"{file}: given twice; pass each checkpoint file once")
            for name in header.tensors:
                if name in owners:
                    raise ValueError(f"{file}: tensor {name!r} is also in {owners[name]}; a tensor name must be "
                                     "in one file only")
                owners[name] = file
            headers[file] = header
    if not owners:
        raise ValueError(f"{', '.join(str(s) for s in sources) or 'src'}: no tensors, nothing to read")
    return headers


def checkpoint_files(src: Source) -> list[Path]:
    """The safetensors files of a checkpoint, in reading order, every one checked (header, length, index).

    src: a .safetensors file; a model folder (as from_pretrained: model.safetensors, else
    model.safetensors.index.json with the shards it names, else the *.safetensors files it holds, sorted); an
    index file; or a list of these.
    ValueError naming the file: a missing or truncated shard, an index naming a missing file or tensor (or a shard
    holding a tensor the index does not list), a tensor in two files, a pickle checkpoint, no tensors."""
    return list(_checkpoint_headers(src))


def iter_checkpoint(src: Source) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of ``src`` (as checkpoint_files), one at a time, read through safetensors'
    memory map in file and data order: the caller holds one tensor, never the model."""
    for file, header in _checkpoint_headers(src).items():
        for name in header.tensors:
            yield name, _load_tensor(file, name)


def _load_tensor(file: Path, name: str) -> torch.Tensor:
    # One safe_open per tensor: its memory map goes with the tensor. A map kept open over a whole file keeps every
    # page read so far resident: measured on a 385 MB file of 16 MB bf16 tensors, RSS grew by 500 MB that way and
    # by 68 MB this way (a tensor and a copy of it).
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name)
    except SafetensorError as e:  # the file changed since its header was checked
        raise _header_error(file, str(e)) from None


def checkpoint_metadata(src: Source) -> dict[str, str]:
    """The safetensors metadata of ``src``'s files, merged; ValueError if two files give a key different values."""
    merged: dict[str, str] = {}
    owners: dict[str, Path] = {}
    for file, header in _checkpoint_headers(src).items():
        for key, value in header.metadata.items():
            if merged.setdefault(key, value) != value:
                raise ValueError(f"{file}: metadata {key!r} is {value!r}, {owners[key]} has {merged[key]!r}; "
                                 "the files are not one checkpoint")
            owners.setdefault(key, file)
    return merged


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """Bytes in ``size``: an int, or digits with a unit as transformers reads them: "5GB" (10^9 bytes), "500MB",
    "10KB", "2GiB" (2^30), "64MiB", "8KiB", or plain digits; > 0."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", size) if isinstance(size, str) else None
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif match and match.group(2).upper() in SIZE_UNITS:
        nbytes = int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    else:
        raise ValueError(f"{what}: expected bytes as an int or a size like '5GB', '500MB' or '2GiB', got {size!r}")
    if nbytes <= 0:
        raise ValueError(f"{what}: expected a size > 0, got {size!r}")
    return nbytes


class _Planned(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    produce: Callable[[], torch.Tensor]


def _plan(items: Iterable[tuple], metadata: Mapping[str, str] | None) -> tuple[list[_Planned], dict[str, str]]:
    """Every item and the metadata checked before any file is written."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in metadata.items()):
        raise TypeError(f"metadata: expected a dict of str → str (safetensors metadata), got {metadata!r}")
    planned, names = [], set()
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 4):
            raise TypeError(f"items[{i}]: expected (name, shape, dtype, produce), got {item!r}")
        name, shape, dtype, produce = item
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(name, str) or not callable(produce) or dtype not in DTYPE_CODES:
            raise TypeError(f"items[{i}]: expected a str name, a callable produce and a dtype safetensors stores "
                            f"({sorted(str(d) for d in DTYPE_CODES)}), got {item!r}")
        if not (isinstance(shape, Sequence) and all(_is_count(d) for d in shape)):
            raise TypeError(f"items[{i}] ({name!r}): shape: expected a sequence of ints >= 0, got {shape!r}")
        if name == METADATA_KEY:
            raise ValueError(f"tensor name {name!r} is reserved by safetensors (it holds the file's metadata); "
                             "rename the tensor")
        if name in names:
            raise ValueError(f"tensor name {name!r} appears twice; names must be unique")
        names.add(name)
        planned.append(_Planned(name, tuple(shape), dtype, math.prod(shape) * dtype.itemsize, produce))
    return planned, dict(metadata)


def _split(planned: list[_Planned], max_shard_nbytes: int) -> list[list[_Planned]]:
    """Greedy, in order: a shard is closed when the next tensor would take it past the limit; a tensor larger than
    the limit gets a shard of its own (as transformers splits)."""
    shards: list[list[_Planned]] = [[]]
    for tensor in planned:
        if shards[-1] and sum(t.nbytes for t in shards[-1]) + tensor.nbytes > max_shard_nbytes:
            shards.append([])
        shards[-1].append(tensor)
    return shards


def _write_safetensors(f: BinaryIO, shard: list[_Planned], metadata: dict[str, str]) -> None:
    """The header first, from shapes and dtypes; then each tensor, produced when its bytes are written."""
    header: dict[str, object] = {METADATA_KEY: metadata} if metadata else {}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    f.write(struct.pack("<Q", len(data)) + data)
    for t in shard:
        f.write(_produce_bytes(t))  # nothing holds the tensor once written, so the next one replaces it in memory


def _produce_bytes(t: _Planned) -> memoryview:
    tensor = t.produce()
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
        got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else repr(tensor)
        raise ValueError(f"tensor {t.name!r}: produce() returned {got}, the header promised {t.shape} {t.dtype}")
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_checkpoint(items: Iterable[tuple[str, Sequence[int], torch.dtype | str, Callable[[], torch.Tensor]]],
                     out: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write tensors as safetensors, streamed: peak memory is one tensor, not a shard. Returns the files written.

    items: (name, shape, dtype, produce) per tensor, in file order; dtype a torch.dtype or its name ("bfloat16");
    produce() returns the tensor (any device), called once, when its bytes are written.
    out: a path ending in .safetensors → that one file; else a folder in transformers' layout: model.safetensors
    when every tensor fits one shard of max_shard_size bytes (an int, or "5GB", "500MB", "2GiB"), else
    model-0000k-of-0000n.safetensors + model.safetensors.index.json; weight files of an earlier save that the new
    ones do not replace are removed (transformers prefers a model.safetensors over an index).
    metadata: the files' safetensors metadata (str → str), written into every shard.
    Every file is staged beside its target and renamed when all are written: an error leaves ``out`` as it was."""
    out = Path(out)
    max_shard_nbytes = parse_size(max_shard_size)
    planned, metadata = _plan(items, metadata)
    if out.suffix == ".safetensors":
        shards = {out: planned}
    else:
        split = _split(planned, max_shard_nbytes)
        shards = {out / SINGLE_FILE: split[0]} if len(split) == 1 else {
            out / f"model-{k:05d}-of-{len(split):05d}.safetensors": shard for k, shard in enumerate(split, 1)}
    with StagedWrites() as staged:
        for file, shard in shards.items():
            with staged.open(file) as f:
                _write_safetensors(f, shard, metadata)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                     "weight_map": {t.name: file.name for file, shard in shards.items() for t in shard}}
            with staged.open(out / INDEX_FILE) as f:
                f.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    written = [*shards, out / INDEX_FILE] if len(shards) > 1 else list(shards)
    if out.suffix != ".safetensors":
        _remove_stale_weights(out, keep=written)
    return written


def _remove_stale_weights(folder: Path, keep: list[Path]) -> None:
    """Delete the weight files of an earlier save that the new ones did not replace: transformers would load a
    stale model.safetensors rather than the index beside it, and a stale shard wastes disk."""
    for file in folder.iterdir():
        is_weights = file.name in (SINGLE_FILE, INDEX_FILE) or SHARD_FILE.fullmatch(file.name)
        if is_weights and file not in keep and file.is_file():
            file.unlink()


def model_folder_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """name → bytes of the small files that from_pretrained and the tokenizer read beside the weights
    (config.json, generation_config.json, tokenizer.json, tokenizer.model, ...): the files directly in ``folder``
    ending in MODEL_FILE_SUFFIXES, of at most MAX_MODEL_FILE_NBYTES; the weights' index is left out
    (write_checkpoint writes its own)."""
    return {file.name: file.read_bytes() for file in sorted(Path(folder).iterdir())
            if file.suffix in MODEL_FILE_SUFFIXES and file.name != INDEX_FILE and file.is_file()
            and file.stat().st_size <= MAX_MODEL_FILE_NBYTES}


def encode_model_files(files: Mapping[str, bytes]) -> str:
    """The JSON text stored under MODEL_FILES_KEY: an object name → the file's text, or {"base64": ...} for a file
    that is not UTF-8 (a sentencepiece tokenizer.model)."""
    encoded: dict[str, object] = {}
    for name, data in files.items():
        try:
            encoded[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            encoded[name] = {"base64": base64.b64encode(data).decode("ascii")}
    return json.dumps(encoded, ensure_ascii=False, sort_keys=True)


def decode_model_files(text: str) -> dict[str, bytes]:
    """The files of encode_model_files' ``text``; ValueError for a malformed value or a name that
    write_model_files would refuse."""
    try:
        encoded = json.loads(text)
        if not isinstance(encoded, dict):
            raise ValueError(f"expected a JSON object name → text, got {type(encoded).__name__}")
        files = {}
        for name, value in encoded.items():
            _check_model_file_name(name)
            if isinstance(value, str):
                files[name] = value.encode("utf-8")
            elif isinstance(value, dict) and value.keys() == {"base64"} and isinstance(value["base64"], str):
                files[name] = base64.b64decode(value["base64"], validate=True)
            else:
                raise ValueError(f"file {name!r}: expected its text or {{'base64': str}}, got {value!r:.60}")
    except (ValueError, RecursionError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"metadata {MODEL_FILES_KEY!r}: {e}") from None
    return files


def _check_model_file_name(name: str) -> None:
    """A name that stays inside the folder it is written to and cannot replace the weights or their index."""
    if not (name == Path(name).name and "\\" not in name and "\0" not in name
            and Path(name).suffix in MODEL_FILE_SUFFIXES and name != INDEX_FILE):
        raise ValueError(f"file name {name!r}: expected a plain file name (no folders, no '..') ending in "
                         f"{', '.join(MODEL_FILE_SUFFIXES)}, other than {INDEX_FILE}")


def write_model_files(folder: str | os.PathLike, files: Mapping[str, bytes]) -> list[Path]:
    """Write ``files`` (name → bytes) into ``folder``, each atomically; every name is checked first (plain file
    names only: a .slim file is input, and its names must not reach outside the folder). Returns the paths."""
    for name in files:
        _check_model_file_name(name)
    return [write_bytes_atomic(Path(folder) / name, data) for name, data in files.items()]


def local_model_folder(path: str | os.PathLike, argument: str = "path") -> Path:
    """``path`` as a local transformers model folder (one holding config.json, as save_pretrained writes); a
    ValueError naming ``argument`` otherwise. Nothing is looked up online."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{argument}: {os.fspath(path)} is not a folder; expected a local transformers model folder "
                         "(config.json + weights, as save_pretrained writes); slimrate never downloads models")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{argument}: {folder} holds no config.json; pass the folder save_pretrained wrote, or write "
                         "the config there with config.save_pretrained(folder)")
    return folder

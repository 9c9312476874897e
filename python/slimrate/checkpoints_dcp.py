"""torch.distributed.checkpoint (DCP) folders, one tensor at a time, in one process without a process group: the
model's tensors of a sharded checkpoint (FSDP2, each rank its own ``__<rank>_0.distcp``) read back whole, a tensor
assembled from its chunks, so memory holds one tensor, never the model (docs/slim-format.md §12).

A DCP folder (``dcp.save`` with its FileSystemWriter) holds ``.metadata``, a pickle of DCP's ``Metadata``: per saved
key (nested dicts flattened with "."), the tensor's global shape and dtype and its chunks (offsets and sizes in the
global tensor), and per chunk the file and the byte range where it is stored, as ``torch.save`` of that chunk.
``.metadata`` is read with an unpickler that builds only DCP's metadata classes, ``torch.Size``, dtypes and layouts
(torch's own reader unpickles it without restriction, which lets the file run code); every chunk with its zip
checksums checked, then ``torch.load(weights_only=True)``, torch's restricted unpickler. Every field is checked
before anything is read.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

METADATA_FILE = ".metadata"
MODEL_KEY = "model"  # the state dict the training loop saves is {"model": ..., "optimizer": ...}
MAX_METADATA_NBYTES = 2**30  # a .metadata of 10^5 tensors × 10^3 chunks is ~10^8 bytes
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {  # what DCP's FileSystemWriter pickles into .metadata (torch 2.4 to 2.13)
    *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                         "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                         "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
}


class DcpChunk(NamedTuple):
    """One stored piece of a tensor: its place in the global tensor and the bytes of its torch.save."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    offset: int  # bytes into ``file``
    length: int


class DcpTensor(NamedTuple):
    """A tensor of a DCP checkpoint: its DCP key, global shape and dtype, and chunks that tile it."""
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[DcpChunk]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not (dtype or (module, name) in _SAFE_GLOBALS):
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP's metadata does not hold (refused "
                                         "unread: unpickling it could run code)")
        return super().find_class(module, name)


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a DCP ``.metadata`` file."""
    return (Path(path) / METADATA_FILE).is_file()


def _metadata_error(file: Path, reason: str) -> ValueError:
    return ValueError(f"{file}: not a torch.distributed.checkpoint .metadata file ({reason})")


def read_dcp_metadata(folder: str | os.PathLike):
    """DCP's ``Metadata`` from ``folder/.metadata``, unpickled with only DCP's metadata classes allowed; ValueError
    naming the file for anything else (another pickle, a truncated or corrupt file)."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = Path(folder) / METADATA_FILE
    if not file.is_file():
        raise ValueError(f"{folder}: no {METADATA_FILE} file; expected a folder written by "
                         "torch.distributed.checkpoint.save")
    if file.stat().st_size > MAX_METADATA_NBYTES:
        raise _metadata_error(file, f"{file.stat().st_size} bytes, above the {MAX_METADATA_NBYTES} bytes read")
    data = file.read_bytes()  # all of it: the unpickler then cannot be told to read past the end
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # a forged pickle fails in many ways (UnpicklingError, EOFError, TypeError, KeyError, ...)
        raise _metadata_error(file, f"{type(e).__name__}: {e}") from None
    if type(metadata) is not Metadata:
        raise _metadata_error(file, f"it holds a {type(metadata).__name__}, expected DCP's Metadata")
    return metadata


def _sizes(value: object) -> tuple[int, ...] | None:
    """``value`` as a shape (a tuple or torch.Size of ints >= 0), or None."""
    if not isinstance(value, tuple) or not all(type(d) is int and 0 <= d < 2**63 for d in value):
        return None
    return tuple(value)


def _model_keys(metadata, file: Path) -> dict[str, str]:
    """name → DCP key of the tensors to read. A state dict saved as {"model": ..., ...} (DCP's default planner
    records each key's path in the saved dict): the tensors under "model", named by their path inside it; any
    other: every tensor, named by its key."""
    entries = getattr(metadata, "state_dict_metadata", None)
    paths = getattr(metadata, "planner_data", None)
    if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
        raise _metadata_error(file, "state_dict_metadata is not a dict of keys")
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    paths = paths if isinstance(paths, dict) else {}
    tensors = [key for key, entry in entries.items() if type(entry) is not BytesStorageMetadata]
    nested = [key for key in tensors if isinstance(paths.get(key), (tuple, list)) and len(paths[key]) >= 2
              and paths[key][0] == MODEL_KEY and key.startswith(f"{MODEL_KEY}.")]
    return {key[len(MODEL_KEY) + 1:]: key for key in nested} if nested else {key: key for key in tensors}


def _storage_index(metadata, folder: Path, file: Path) -> dict[tuple[str, tuple[int, ...]], tuple[Path, int, int]]:
    """(key, chunk offsets) → (file, byte offset, length) from the metadata's storage_data, every field checked."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise _metadata_error(file, "storage_data is not a dict")
    index = {}
    for where, info in storage.items():
        name, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if type(where) is not MetadataIndex or not isinstance(where.fqn, str) or not (
                isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
                and type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
            raise _metadata_error(file, f"a storage entry {where!r:.100} → {info!r:.200} is not a chunk's file "
                                        "and byte range in the folder")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{file}: chunk {where.fqn!r} is stored through {info.transform_descriptors!r:.100}; "
                             "only plain FileSystemWriter checkpoints are read (save without extensions)")
        index[where.fqn, _sizes(where.offset)] = (folder / name, offset, length)
    return index


def _check_tensor(key: str, entry, index: dict, file: Path) -> DcpTensor:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    shape, chunks = _sizes(getattr(entry, "size", None)), getattr(entry, "chunks", None)
    if type(entry) is not TensorStorageMetadata or not isinstance(dtype, torch.dtype) or shape is None \
            or not isinstance(chunks, list):
        raise _metadata_error(file, f"tensor {key!r}: expected its dtype, size and chunks, got {entry!r:.200}")
    checked = []
    for chunk in chunks:
        offsets, sizes = _sizes(getattr(chunk, "offsets", None)), _sizes(getattr(chunk, "sizes", None))
        if type(chunk) is not ChunkStorageMetadata or offsets is None or sizes is None or not (
                len(offsets) == len(sizes) == len(shape)
                and all(o + s <= d for o, s, d in zip(offsets, sizes, shape, strict=True))):
            raise _metadata_error(file, f"tensor {key!r} of shape {list(shape)}: a chunk {chunk!r:.200} does not lie "
                                        "inside it")
        if (key, offsets) not in index:
            raise _metadata_error(file, f"tensor {key!r}: its chunk at {list(offsets)} has no file and byte range")
        chunk_file, offset, length = index[key, offsets]
        if length < math.prod(sizes) * dtype.itemsize:
            raise _metadata_error(file, f"tensor {key!r}: its chunk at {list(offsets)} of {list(sizes)} × {dtype} "
                                        f"is given {length} bytes in {chunk_file.name}")
        checked.append(DcpChunk(offsets, sizes, chunk_file, offset, length))
    if sum(math.prod(c.sizes) for c in checked) != math.prod(shape):
        raise ValueError(f"{file}: tensor {key!r}: its chunks hold {sum(math.prod(c.sizes) for c in checked)} "
                         f"elements, the tensor {math.prod(shape)} ({list(shape)}); the chunks do not cover it "
                         "(a checkpoint of another model's shards?)")
    return DcpTensor(key, shape, dtype, checked)


def _check_files(tensors: list[DcpTensor], file: Path) -> None:
    """Every chunk's byte range inside its file, and no two ranges overlapping: the tensors' bytes are in the
    files, so what the metadata claims cannot outgrow the folder."""
    ranges: dict[Path, list[tuple[int, int, str]]] = {}
    for tensor in tensors:
        for chunk in tensor.chunks:
            ranges.setdefault(chunk.file, []).append((chunk.offset, chunk.offset + chunk.length, tensor.key))
    for chunk_file, spans in sorted(ranges.items()):
        if not chunk_file.is_file():
            raise ValueError(f"{chunk_file}: missing; {file.name} stores {len(spans)} chunks there (of tensor "
                             f"{spans[0][2]!r}, ...); copy the whole checkpoint folder again")
        size = chunk_file.stat().st_size
        spans.sort()
        end = next((span for span in spans if span[1] > size), None)
        if end:
            raise ValueError(f"{chunk_file}: truncated: {file.name} stores a chunk of tensor {end[2]!r} at bytes "
                             f"{end[0]}..{end[1]}, the file has {size} bytes; copy it again")
        for (_, end, key), (begin, _, other) in itertools.pairwise(spans):
            if begin < end:
                raise _metadata_error(file, f"chunks of tensors {key!r} and {other!r} overlap in {chunk_file.name}")


def dcp_tensors(folder: str | os.PathLike) -> dict[str, DcpTensor]:
    """name → DcpTensor for the model tensors of the DCP checkpoint in ``folder``, in the metadata's order, every
    field checked and every chunk's file and byte range present, nothing read yet.

    Which tensors: of a state dict saved as {"model": model_sd, "optimizer": ..., ...} (the training loop's sharded
    checkpoints), those under "model", named as in model_sd; of any other (dcp.save(model.state_dict())), every
    tensor, by its key. Non-tensor entries are skipped. ValueError naming the file for a .metadata that is not
    DCP's, a missing or truncated chunk file, chunks that do not tile their tensor."""
    folder = Path(folder)
    metadata = read_dcp_metadata(folder)
    file = folder / METADATA_FILE
    keys = _model_keys(metadata, file)
    if not keys:
        raise ValueError(f"{file}: the checkpoint holds no tensors, nothing to read")
    index = _storage_index(metadata, folder, file)
    tensors = {name: _check_tensor(key, metadata.state_dict_metadata[key], index, file) for name, key in keys.items()}
    _check_files(list(tensors.values()), file)
    return tensors


def _load_chunk(tensor: DcpTensor, chunk: DcpChunk) -> torch.Tensor:
    where = f"{chunk.file}: bytes {chunk.offset}..{chunk.offset + chunk.length} (a chunk of tensor {tensor.key!r} " \
            f"at {list(chunk.offsets)})"
    with open(chunk.file, "rb") as f:
        f.seek(chunk.offset)
        data = f.read(chunk.length)
    if len(data) != chunk.length:
        raise ValueError(f"{where}: the file ends after {len(data)} of them (it changed while being read)")
    try:
        # torch.load does not check the zip's CRC-32s: a flipped byte of the tensor's data would load as a wrong
        # value. testzip checks them (8 MB in 5 ms); stored members only, so nothing is inflated.
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if any(member.compress_type != zipfile.ZIP_STORED for member in archive.infolist()):
                raise ValueError("a compressed zip member, torch.save stores them uncompressed")
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"{bad}: CRC-32 mismatch")
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt bytes fail in zipfile, torch's zip reader or unpickler in many ways
        raise ValueError(f"{where}: not a saved tensor ({type(e).__name__}: {str(e).splitlines()[0]:.200}); the "
                         "file is corrupt, copy it again") from None
    if type(loaded) is not torch.Tensor or loaded.layout != torch.strided or loaded.dtype != tensor.dtype \
            or tuple(loaded.shape) != chunk.sizes:
        got = f"{list(loaded.shape)} × {loaded.dtype}" if isinstance(loaded, torch.Tensor) else type(loaded).__name__
        raise ValueError(f"{where}: holds {got}, the metadata says {list(chunk.sizes)} × {tensor.dtype}")
    return loaded


def read_dcp_tensor(tensor: DcpTensor) -> torch.Tensor:
    """The whole tensor, from its chunks (each read from its byte range only). Peak memory: the tensor, a mask of
    one byte per element when it has several chunks, and one chunk twice (its bytes and the loaded chunk)."""
    if len(tensor.chunks) == 1:  # dcp_tensors checked it holds every element: the chunk is the tensor
        return _load_chunk(tensor, tensor.chunks[0])
    whole = torch.empty(tensor.shape, dtype=tensor.dtype)
    filled = torch.zeros(tensor.shape, dtype=torch.bool)
    for chunk in tensor.chunks:
        place = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
        if filled[place].any():  # with the element count checked, an overlap is also a hole
            raise ValueError(f"{chunk.file}: tensor {tensor.key!r}'s chunk at {list(chunk.offsets)} overlaps another "
                             "of its chunks, so they do not cover the tensor")
        whole[place] = _load_chunk(tensor, chunk)
        filled[place] = True
    return whole


def iter_dcp_checkpoint(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the model tensors of the DCP checkpoint in ``folder`` (as dcp_tensors), one at a time,
    in one process with no process group: the caller holds one tensor, never the model."""
    for name, tensor in dcp_tensors(folder).items():
        yield name, read_dcp_tensor(tensor)

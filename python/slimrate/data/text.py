"""Character text in the text8 alphabet: the embedded default corpus, user files, encode/decode, splits.

text8 (Matt Mahoney, http://mattmahoney.net/dc/textdata.html) is Wikipedia reduced to 27 symbols:
lowercase a–z and space. We follow its convention with one simplification: ASCII letters are
lowercased, *every* other character (digits, punctuation, newlines, non-ASCII letters such as é or
the Kelvin sign) becomes a space, and runs of spaces collapse to one. (Mahoney's ``wikifil.pl``
also spells digits out as words; we do not, so a number becomes a word boundary.) The real text8
file is already in this form, so normalising it changes at most its leading space.

The default corpus is CPython's ``pydoc_data.topics`` (the ``help()`` topic pages, every install
has them): topics in sorted-key order, joined by a space, normalised — 375,756 characters on
CPython 3.11, no download needed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch

# Space first, then a–z: the sorted ASCII order, so ids follow character order (as nanoGPT's
# shakespeare_char `sorted(set(text))` gives). Id 0 is the space.
TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = len(TEXT8_ALPHABET)  # 27
VAL_FRACTION = 0.1

# bytes → normalised byte: A–Z → a–z, a–z kept, everything else → space. Non-ASCII characters are
# first replaced by "?" (str.encode(..., "replace")), so they too become spaces.
_TO_TEXT8 = bytes(
    b if 97 <= b <= 122 else b + 32 if 65 <= b <= 90 else 32 for b in range(256)
)
# byte → id, 255 marks a byte outside the alphabet.
_BYTE_TO_ID = np.full(256, 255, dtype=np.uint8)
_BYTE_TO_ID[np.frombuffer(TEXT8_ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(VOCAB_SIZE, dtype=np.uint8)
_ID_TO_BYTE = np.frombuffer(TEXT8_ALPHABET.encode("ascii"), dtype=np.uint8)


def normalize_text8(text: str) -> str:
    """Reduce any text to the text8 alphabet (see the module docstring).

    ASCII letters are lowercased; every other character becomes a space; runs of spaces collapse to
    one and leading/trailing spaces are removed. Returns a str over ``TEXT8_ALPHABET`` ("" if the
    text has no ASCII letter).
    """
    mapped = text.encode("ascii", "replace").translate(_TO_TEXT8)
    return b" ".join(mapped.split()).decode("ascii")


def encode(text: str) -> torch.Tensor:
    """Ids of a text8 string: (n,) uint8 in [0, 27), id = ``TEXT8_ALPHABET.index(char)``.

    uint8 keeps a 100M-character corpus (real text8) at 100 MB; ``get_lm_batch`` widens windows to
    int64. Raises ValueError naming the first character outside the alphabet (normalise first).
    """
    try:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError as err:
        raise ValueError(f"text: expected text8 characters, got {text[err.start]!r} at index {err.start}; "
                         "pass it through normalize_text8 first") from None
    ids = _BYTE_TO_ID[raw]
    bad = np.flatnonzero(ids == 255)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"text: expected text8 characters, got {text[i]!r} at index {i}; "
                         "pass it through normalize_text8 first")
    return torch.from_numpy(ids.copy())


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Text of ids in [0, 27) (any integer dtype, any shape, flattened). Raises ValueError otherwise."""
    arr = ids.detach().cpu().reshape(-1).numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids: expected an integer dtype, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"ids: expected values in [0, {VOCAB_SIZE}), got min {arr.min()} max {arr.max()}")
    return _ID_TO_BYTE[arr.astype(np.int64)].tobytes().decode("ascii")


@functools.lru_cache(maxsize=1)
def _embedded_corpus() -> str:
    from pydoc_data.topics import topics

    return normalize_text8(" ".join(topics[key] for key in sorted(topics)))


def load_text_corpus(path: str | os.PathLike | None = None) -> str:
    """A normalised text8 string: the embedded pydoc corpus (``path=None``, cached) or a UTF-8 file.

    Any text file works (real text8, enwik8, a book); it is read as UTF-8 (undecodable bytes become
    spaces via U+FFFD) and normalised. Raises FileNotFoundError naming a missing path and
    ValueError if the file holds no ASCII letter.
    """
    if path is None:
        return _embedded_corpus()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no text file at {os.fspath(path)!r}; pass a UTF-8 text file "
                                "(e.g. text8) or None for the embedded corpus")
    with open(path, encoding="utf-8", errors="replace") as f:
        corpus = normalize_text8(f.read())
    if not corpus:
        raise ValueError(f"path: {os.fspath(path)!r} holds no letters a–z after text8 normalisation")
    return corpus


def char_splits(corpus: str, val_fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split of ``encode(corpus)``: (train_ids (n - n_val,), val_ids (n_val,)), uint8.

    The last ``round(val_fraction * n)`` characters are validation: a contiguous tail, as is usual
    for text8 (90M/5M/5M train/val/test), so validation text is never seen in training windows.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    ids = encode(corpus)
    n_val = round(val_fraction * len(ids))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]

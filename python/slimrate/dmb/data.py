"""Token data sets for DMB: text in the text8 alphabet, digits and CIFAR-10 images as pixel tokens.

A ``TokenData`` holds the training tokens, a fixed evaluation set and how to draw a batch:
- text (``"text8"``: the embedded pydoc corpus, DESIGN.md "Data"; or any text file, e.g. real text8):
  27 symbols; training batches are random windows of ``seq_len`` characters from the training split,
  evaluation sequences are non-overlapping windows of the validation split (the last 10%).  Positions
  are exchangeable under random windows, so statistics are pooled over positions (``shared_positions``).
- ``"digits"``: scikit-learn's 8×8 digits, each pixel one token of 17 grey levels (0–16), L = 64,
  the fixed train/test split of ``slimrate.data.digits``; per-pixel statistics.
- CIFAR-10 (a folder holding the python-pickle batches ``data_batch_1..5`` and ``test_batch``):
  32×32×3 pixels, each channel value one token of 256 levels, L = 3072 (channel-major, as stored).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimrate.data.digits import load_digits_split
from slimrate.data.text import VOCAB_SIZE, char_splits, decode, load_text_corpus

DIGITS_LEVELS = 17  # load_digits pixels are integers 0..16
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_SHAPE = (3, 32, 32)
# The only globals a CIFAR-10 python batch references (numpy arrays inside a dict); numpy 2 writes
# numpy._core, numpy 1 numpy.core; a batch re-pickled by Python 3 at protocol 2 stores bytes through
# _codecs.encode (text → bytes, runs no code; torch's weights_only loader allows it too).
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


@dataclass
class TokenData:
    """A token data set.  train: text (n,) uint8 stream, images (N, L) uint8; eval (M, L) int64.
    vocab_size: data symbols.  image_shape: (C, H, W) for images (tokens in C-H-W order), None for text."""

    name: str
    vocab_size: int
    seq_len: int
    train: torch.Tensor
    eval: torch.Tensor
    shared_positions: bool
    image_shape: tuple[int, int, int] | None = None

    @property
    def is_text(self) -> bool:
        return self.image_shape is None

    @property
    def train_windows(self) -> int:
        """Training sequences in one pass over the data: non-overlapping windows of ``seq_len`` for text (the
        official text8 chunking), images for image data."""
        return len(self.train) // self.seq_len if self.is_text else len(self.train)

    def batch_fn(self, batch: int, seed: int,
                 device: torch.device | str = "cpu") -> Callable[[int, int, int], torch.Tensor]:
        """``get_batch(step, rank, world_size) -> x0 (batch/world_size, L) int64`` on ``device``, a function of
        the step (the shared loop's contract), this rank's share of the step's global batch; drawn on the CPU, so
        a seed gives the same batches on every device."""
        def get_batch(step: int, rank: int, world_size: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            if self.is_text:
                starts = torch.randint(0, len(self.train) - self.seq_len + 1, (batch,), generator=generator)
                x0 = self.train[starts[:, None] + torch.arange(self.seq_len)]
            else:
                x0 = self.train[torch.randint(0, len(self.train), (batch,), generator=generator)]
            return x0.long().tensor_split(world_size)[rank].to(device)
        return get_batch

    def histogram(self) -> torch.Tensor:
        """μ̂ (L, V) float64: per-position training histogram (pooled over positions for text)."""
        if self.shared_positions:
            counts = torch.bincount(self.train.long().reshape(-1), minlength=self.vocab_size).double()
            return (counts / counts.sum()).expand(self.seq_len, -1).clone()
        flat = (torch.arange(self.seq_len) * self.vocab_size + self.train.long()).reshape(-1)  # (N·L,)
        counts = torch.bincount(flat, minlength=self.seq_len * self.vocab_size).double()
        return counts.view(self.seq_len, self.vocab_size) / len(self.train)

    def eval_subset(self, n: int) -> torch.Tensor:
        """``n`` evaluation sequences (M, L) int64, evenly spaced over the evaluation set (all of it if
        n ≥ its size): a fixed subset, the same for every call, method and step."""
        if n >= len(self.eval):
            return self.eval
        return self.eval[torch.linspace(0, len(self.eval) - 1, n).round().long()]

    def describe(self, tokens: torch.Tensor) -> list[str]:
        """Text of each token row (text data); raises for images (use ``image_grid_png``)."""
        if not self.is_text:
            raise ValueError(f"tokens: {self.name} holds images; write them with image_grid_png")
        return [decode(row) for row in tokens]


def load_token_data(spec: str, seq_len: int = 64) -> TokenData:
    """``spec``: "text8" (the embedded corpus), "digits", a text file, or a CIFAR-10 batches folder.
    ``seq_len`` applies to text only.  Raises FileNotFoundError naming a missing path."""
    if spec == "digits":
        return load_digits_tokens()
    if spec == "text8":
        return load_text_tokens(None, seq_len)
    path = Path(spec)
    if path.is_dir():
        return load_cifar10_tokens(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {spec!r} is neither 'text8', 'digits', a text file nor a folder of "
                                "CIFAR-10 python batches")
    return load_text_tokens(path, seq_len)


def load_text_tokens(path: str | os.PathLike | None, seq_len: int) -> TokenData:
    """Text in the text8 alphabet (``slimrate.data.text``): the embedded corpus or a file at ``path``."""
    if seq_len < 2:
        raise ValueError(f"seq_len: expected >= 2, got {seq_len}")
    train, val = char_splits(load_text_corpus(path))
    n_eval = len(val) // seq_len
    if n_eval < 1 or len(train) < seq_len:
        raise ValueError(f"data: {path or 'the embedded corpus'} is too short for seq_len={seq_len} "
                         f"({len(train)} training and {len(val)} validation characters)")
    evaluation = val[: n_eval * seq_len].view(n_eval, seq_len).long()
    name = "text8 (embedded pydoc corpus)" if path is None else f"text {Path(path).name}"
    return TokenData(name, VOCAB_SIZE, seq_len, train, evaluation, shared_positions=True)


def load_digits_tokens() -> TokenData:
    """scikit-learn's 8×8 digits as 64 tokens of 17 grey levels."""
    x_train, _, x_test, _ = load_digits_split()
    to_tokens = lambda x: torch.round(x * (DIGITS_LEVELS - 1)).to(torch.uint8)  # noqa: E731 (x = level/16)
    return TokenData("digits 8×8", DIGITS_LEVELS, 64, to_tokens(x_train), to_tokens(x_test).long(),
                     shared_positions=False, image_shape=(1, 8, 8))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, bytes, str, ints and numpy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"CIFAR-10 batch: refusing to load global {module}.{name}; a real "
                                         "CIFAR-10 python batch references only numpy arrays")
        return super().find_class(module, name)


def read_cifar10_batch(path: str | os.PathLike) -> np.ndarray:
    """The images of one CIFAR-10 python batch as (N, 3072) uint8 (R, G, B planes of 32×32).

    WARNING: the batches are Python pickles, and unpickling can run code.  This reader only lets the
    pickle build numpy arrays (every other global is refused with an UnpicklingError), which closes the
    usual attacks, but pickle was never designed to be safe: open only batches from a source you trust
    (https://www.cs.toronto.edu/~kriz/cifar.html).
    """
    with open(path, "rb") as f:
        batch = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"{path}: expected a CIFAR-10 python batch (a dict with b'data'), got {type(batch).__name__}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != int(np.prod(CIFAR_SHAPE)):
        raise ValueError(f"{path}: expected b'data' as (N, 3072) uint8, got {data.shape} {data.dtype}")
    return data


def load_cifar10_tokens(folder: str | os.PathLike) -> TokenData:
    """CIFAR-10 from the python batches in ``folder`` (see ``read_cifar10_batch``'s warning): the
    training batches present (at least one) and ``test_batch``; 256 levels per channel value."""
    folder = Path(folder)
    train_files = [folder / name for name in CIFAR_TRAIN if (folder / name).is_file()]
    if not train_files or not (folder / CIFAR_TEST).is_file():
        raise FileNotFoundError(f"data: {folder} holds no CIFAR-10 python batches; expected data_batch_1..5 "
                                f"(at least one) and {CIFAR_TEST}")
    train = torch.from_numpy(np.concatenate([read_cifar10_batch(f) for f in train_files]))
    test = torch.from_numpy(read_cifar10_batch(folder / CIFAR_TEST)).long()
    return TokenData(f"CIFAR-10 {folder.name}", 256, train.shape[1], train, test, shared_positions=False,
                     image_shape=CIFAR_SHAPE)


def image_grid_png(tokens: torch.Tensor, data: TokenData, columns: int = 8) -> bytes:
    """PNG bytes of token rows (N, L) shown as a grid of images (grey levels scaled to [0, 1])."""
    from matplotlib.figure import Figure  # Agg rendering, no display

    from slimrate.files import figure_png

    if data.image_shape is None:
        raise ValueError(f"data: {data.name} is text; print its samples instead")
    C, H, W = data.image_shape
    images = (tokens.double() / (data.vocab_size - 1)).view(-1, C, H, W).permute(0, 2, 3, 1).numpy()
    n = len(images)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(cols * 0.9, rows * 0.9))
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(images[i, ..., 0] if C == 1 else images[i], cmap="gray" if C == 1 else None, vmin=0, vmax=1)
    return figure_png(fig)

"""Size proxies reported by the demo and studies: the empirical entropy of quantized weights and the size of
a fixed-length code of them."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from slimrate.backslash.slim_file import load_slim, slim_report
from slimrate.backslash.slim_writer import save_slim
from slimrate.ops import eg_code_length


def symbol_entropy_bits(symbols: torch.Tensor) -> float:
    """H(q) = −Σ p·log2 p of the symbols' empirical distribution, in bits per symbol (0 when empty).

    The lower bound of any symbol-by-symbol code of the stream (docs/backslash.md §7).
    """
    if symbols.numel() == 0:
        return 0.0
    _, counts = torch.unique(symbols.reshape(-1), return_counts=True)
    p = counts.double() / symbols.numel()
    return float(-(p * torch.log2(p)).sum())


def fixed_length_bits(symbols: torch.Tensor) -> float:
    """Bits per symbol of one tensor's fixed-length code, table included (docs/backslash.md §7).

    symbols: int32 (any shape), the tensor's quantized weights.  With K distinct values each symbol takes
    ⌈log2 K⌉ bits (0 when K = 1), written in whole bytes; the table of the K values is counted as .slim's
    "eg" coder stores its table: signed exp-Golomb of order 0 of each value, in whole bytes.
    """
    if symbols.dtype != torch.int32:
        raise TypeError(f"symbols: expected int32 quantized weights, got {symbols.dtype}; quantize them with "
                        "slimrate.ops.quantize")
    if symbols.numel() == 0:
        raise ValueError("symbols: expected at least one symbol, got an empty tensor")
    table = torch.unique(symbols.reshape(-1))
    code_bits = symbols.numel() * math.ceil(math.log2(table.numel()))
    table_bits = eg_code_length(table.to(torch.int32).contiguous(), 0, True)
    return 8 * (math.ceil(code_bits / 8) + math.ceil(table_bits / 8)) / symbols.numel()


def quantized_entropy_bits(tensors: Iterable[torch.Tensor], step: float) -> float:
    """Empirical entropy H(q), in bits per parameter, of q = round(θ/step) pooled over all tensors."""
    if step <= 0:
        raise ValueError(f"step: expected a quantization step > 0, got {step}")
    symbols = torch.cat([torch.round(t.detach().double().flatten() / step) for t in tensors])
    if symbols.numel() == 0:
        raise ValueError("tensors: expected at least one element to measure")
    return symbol_entropy_bits(symbols)


def small_weight_share(tensors: Iterable[torch.Tensor], threshold: float = 1e-3) -> float:
    """Share of elements with |θ| < threshold, pooled over all tensors."""
    flat = torch.cat([t.detach().flatten().abs() for t in tensors])
    return float((flat < threshold).double().mean())


def slim_weight_bits(state_dict: Mapping[str, torch.Tensor], names: list[str], step: float,
                     coder: str = "eg") -> tuple[float, dict[str, torch.Tensor]]:
    """Real size of the tensors ``names`` in a .slim file (quantized with ``step``, coded with ``coder``;
    the rest stored losslessly): (bits per element of their payloads, the decoded state dict)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.slim"
        save_slim(dict(state_dict), path, step={name: step for name in names}, coder=coder)
        sizes = {r["name"]: r["bytes"] for r in slim_report(path)}
        bits = 8 * sum(sizes[n] for n in names) / sum(state_dict[n].numel() for n in names)
        return bits, load_slim(path)

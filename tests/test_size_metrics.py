"""The size metrics of slimrate.backslash.metrics against independent counts."""

import math

import pytest
import torch

from slimrate.backslash.metrics import fixed_length_bits


def signed_eg0_bits(value: int) -> int:
    """Length of the signed exp-Golomb code of order 0: zig-zag, then 2⌊log2(u + 1)⌋ + 1 bits."""
    u = 2 * value if value >= 0 else -2 * value - 1
    return 2 * (u + 1).bit_length() - 1


@pytest.mark.parametrize("shape", [(1,), (5, 123), (64, 33)], ids=lambda s: "x".join(map(str, s)))
def test_fixed_length_bits_matches_a_count_of_its_parts(shape):
    symbols = torch.round(torch.randn(shape) * 7).to(torch.int32)
    values = sorted(set(symbols.flatten().tolist()))
    n = symbols.numel()
    code_bytes = math.ceil(n * math.ceil(math.log2(len(values))) / 8)
    table_bytes = math.ceil(sum(signed_eg0_bits(v) for v in values) / 8)
    assert fixed_length_bits(symbols) == pytest.approx(8 * (code_bytes + table_bytes) / n, rel=1e-12)


def test_fixed_length_bits_of_one_distinct_symbol_is_its_table_alone():
    symbols = torch.full((40, 10), -3, dtype=torch.int32)  # ⌈log2 1⌉ = 0 bits per weight; table: -3 → u = 5
    assert fixed_length_bits(symbols) == pytest.approx(8 / 400)


def test_fixed_length_bits_rejects_float_symbols():
    with pytest.raises(TypeError, match="symbols: expected int32 quantized weights, got torch.float32"):
        fixed_length_bits(torch.randn(4, 4))


def test_fixed_length_bits_rejects_an_empty_tensor():
    with pytest.raises(ValueError, match="symbols: expected at least one symbol"):
        fixed_length_bits(torch.zeros(0, dtype=torch.int32))

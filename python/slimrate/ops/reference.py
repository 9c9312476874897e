"""Plain-PyTorch ground truth for every slimrate op: readable over fast, exact in float64.

Tests, benchmarks and ``backend="reference"`` all call these; nothing else re-implements them.
Element-wise work is done in the inputs' own dtype (so running it on float64 copies gives the
truth and on low-precision inputs gives the error a plain PyTorch user would see); sums are float64.
"""

from __future__ import annotations

import torch


def rate_stats(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(N, Σ|θ|, Σθ²) over all tensors, float64 [3] on their device."""
    device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.zeros(3, dtype=torch.float64, device=device)
    for t in tensors:
        x = t.double()
        out += torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64, device=device),
                            x.abs().sum(), (x * x).sum()])
    return out


def rate_grad_(params: list[torch.Tensor], grads: list[torch.Tensor], lam: float, nu: float,
               eps: float) -> torch.Tensor:
    """grads[i] += lam·(ν/N)·sign(θ)·(|θ|+ε)^(ν−1) in place; returns R = (1/N) Σ (|θ|+ε)^ν, float64 [].

    N is the total element count of params; papers/backslash.md §2 and §4.
    """
    device = params[0].device if params else torch.device("cpu")
    n = sum(p.numel() for p in params)
    total = torch.zeros((), dtype=torch.float64, device=device)
    if n == 0:
        return total
    for p, g in zip(params, grads, strict=False):
        a = p.abs() + eps
        total += (a ** nu).double().sum()
        # sign(0) = 0 even where (0 + ε)^(ν−1) is infinite (ε = 0, ν < 1)
        g.add_(lam * (nu / n) * torch.sign(p) * torch.where(a > 0, a, 1) ** (nu - 1))
    return total / n


# ---- entropy coding (papers/backslash.md §6): plain Python, bit-exact to csrc/kernels/entropy_eg.h ----

def _eg_index(s: int, signed: bool) -> int:
    """Zig-zag index u of symbol s (u = 2s for s ≥ 0, −2s − 1 for s < 0), or s itself when unsigned."""
    if signed:
        if s == -(2**31):
            raise ValueError("symbols: INT32_MIN has no signed exp-Golomb code")
        return 2 * s if s >= 0 else -2 * s - 1
    if s < 0:
        raise ValueError(f"symbols: signed=False codes only symbols >= 0, got {s}")
    return s


def _eg_bits(u: int, k: int) -> str:
    """The code of u: w = u + 2^k in binary, after bit_length(w) − 1 − k zeros."""
    w = u + (1 << k)
    return "0" * (w.bit_length() - 1 - k) + format(w, "b")


def eg_code_length(symbols: torch.Tensor, k: int = 0, signed: bool = True) -> int:
    """Σ code lengths in bits: 2·bit_length(u + 2^k) − 1 − k per symbol."""
    return sum(2 * (_eg_index(s, signed) + (1 << k)).bit_length() - 1 - k for s in symbols.tolist())


def eg_encode(symbols: torch.Tensor, k: int = 0, signed: bool = True) -> torch.Tensor:
    """Exp-Golomb order k of int32 symbols, MSB first, last byte zero-padded; uint8 (nbytes,)."""
    bits = "".join(_eg_bits(_eg_index(s, signed), k) for s in symbols.tolist())
    bits += "0" * (-len(bits) % 8)
    return torch.tensor([int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)], dtype=torch.uint8)


def eg_decode(buf: torch.Tensor, count: int, k: int = 0, signed: bool = True) -> torch.Tensor:
    """Decode ``count`` symbols; ValueError when bits run out, a prefix has > 32 zeros, or u is out of range."""
    bits = "".join(format(b, "08b") for b in buf.tolist())
    max_u = 2**32 - 2 if signed else 2**31 - 1
    out, pos = [], 0
    for i in range(count):
        zeros = 0
        while pos + zeros < len(bits) and bits[pos + zeros] == "0" and zeros <= 32:
            zeros += 1
        if zeros > 32:
            raise ValueError(f"buf: corrupt exp-Golomb stream at symbol {i} (a prefix of more than 32 zeros)")
        end = pos + 2 * zeros + 1 + k
        if end > len(bits):
            raise ValueError(f"buf: ran out of bits at symbol {i} of {count}")
        u = int(bits[pos + zeros:end], 2) - (1 << k)
        if u > max_u:
            raise ValueError(f"buf: corrupt exp-Golomb stream at symbol {i} (value out of range)")
        out.append((-(u >> 1) - 1 if u & 1 else u >> 1) if signed else u)
        pos = end
    return torch.tensor(out, dtype=torch.int32)


def sparse_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·Wᵀ + b for a block-CSR W (python/slimrate/sparse/format.py): x [B, in] -> y [B, out].

    W is expanded to dense in ``values``' dtype; the product runs in x's dtype promoted with it
    (float64 in → float64 out: the truth), bias added last; y is returned in x's dtype.
    """
    nb, r, c = values.shape
    brows, in_features = row_ptr.numel() - 1, x.shape[1]
    bcols = -(-in_features // c)
    block_rows = torch.repeat_interleave(torch.arange(brows, device=x.device), row_ptr[1:] - row_ptr[:-1])
    blocks = values.new_zeros(brows, bcols, r, c)
    cols = col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()  # int16: uint16 bits
    blocks[block_rows, cols] = values
    dense = blocks.transpose(1, 2).reshape(brows * r, bcols * c)[:out_features, :in_features]
    dtype = torch.promote_types(x.dtype, values.dtype)
    y = x.to(dtype) @ dense.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)

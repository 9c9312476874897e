"""Plain-PyTorch ground truth for every slimrate op: readable over fast, exact in float64.

Tests, benchmarks and ``backend="reference"`` all call these; nothing else re-implements them.
Element-wise work is done in the inputs' own dtype (so running it on float64 copies gives the
truth and on low-precision inputs gives the error a plain PyTorch user would see); sums are float64.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import math
import struct

import torch

from slimrate.ops import coding


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

    N is the total element count of params; docs/backslash.md §2.
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


# ---- entropy coding (docs/slim-format.md §6): plain Python, bit-exact to csrc/kernels/entropy_eg.h ----

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
    """Decode ``count`` symbols; ValueError when bits run out, a prefix has > 32 zeros, u is out of range, or
    anything but the last byte's zero padding follows the last code."""
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
    if len(bits) - pos >= 8 or "1" in bits[pos:]:
        raise ValueError("buf: trailing bytes or non-zero padding bits after the last code (a padded stream or a "
                         f"count below the stream's); {count} codes read from {buf.numel()} bytes")
    return torch.tensor(out, dtype=torch.int32)


# ---- static rANS (docs/slim-format.md §7): plain Python, byte for byte csrc/kernels/entropy_rans.h ----

_RANS_L = 1 << 23  # the state stays in [L, 2^31); bytes leave and enter it one at a time
_RANS_MAX_SCALE_BITS = 23
_RANS_MAX_ALPHABET = 1 << (_RANS_MAX_SCALE_BITS - 1)


def _varint(v: int) -> bytes:
    """Unsigned LEB128."""
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


def _rans_freqs(counts: list[int], n: int, scale_bits: int) -> list[int]:
    """Frequencies summing to 2^scale_bits, each ≥ 1: count·2^scale_bits/n rounded half away from zero, then the
    surplus taken one unit at a time where count·log2(f/(f−1)) is smallest (ties: the first symbol), or the
    deficit given where count·log2((f+1)/f) is largest (ties: the last symbol), as the C++ heaps order them."""
    total = 1 << scale_bits
    f = []
    for c in counts:
        x = float(c) * total / n
        f.append(max(1, math.floor(x) + (x - math.floor(x) >= 0.5)))
    surplus = sum(f) - total
    if surplus > 0:
        heap = [(c * math.log2(fi / (fi - 1)), i) for i, (c, fi) in enumerate(zip(counts, f, strict=True)) if fi > 1]
        heapq.heapify(heap)
        for _ in range(surplus):
            i = heapq.heappop(heap)[1]
            f[i] -= 1
            if f[i] > 1:
                heapq.heappush(heap, (counts[i] * math.log2(f[i] / (f[i] - 1)), i))
    elif surplus < 0:
        heap = [(-c * math.log2((fi + 1) / fi), -i) for i, (c, fi) in enumerate(zip(counts, f, strict=True))]
        heapq.heapify(heap)
        for _ in range(-surplus):
            i = -heapq.heappop(heap)[1]
            f[i] += 1
            heapq.heappush(heap, (-counts[i] * math.log2((f[i] + 1) / f[i]), -i))
    return f


def rans_encode(symbols: torch.Tensor) -> torch.Tensor:
    """uint8 (nbytes,): mode 0, count, scale_bits, the alphabet (smallest zig-zagged, then gaps − 1) and
    frequencies − 1 as varints, the final state (4 bytes, little-endian) and the renormalisation bytes of symbols
    coded last to first; or mode 1, count and the raw int32s when more than half the symbols are distinct."""
    s = symbols.tolist()
    n = len(s)
    counted = collections.Counter(s)
    alphabet = sorted(counted)
    m = len(alphabet)
    if 2 * m > n + 1 or m > _RANS_MAX_ALPHABET:
        return torch.tensor(list(b"\x01" + _varint(n) + struct.pack(f"<{n}i", *s)), dtype=torch.uint8)
    scale_bits = 16
    while 1 << (scale_bits - 1) < m:  # 2^scale_bits ≥ 2m: every symbol keeps a frequency ≥ 1
        scale_bits += 1
    freq = _rans_freqs([counted[a] for a in alphabet], n, scale_bits) if m else []
    start = [0, *itertools.accumulate(freq)]
    index = {a: j for j, a in enumerate(alphabet)}
    state, stream = _RANS_L, bytearray()
    for v in reversed(s):
        j = index[v]
        while state >= freq[j] << (31 - scale_bits):  # x_max = ((L >> scale_bits) << 8)·freq
            stream.append(state & 0xFF)
            state >>= 8
        state = ((state // freq[j]) << scale_bits) + state % freq[j] + start[j]
    header = b"\x00" + _varint(n) + bytes([scale_bits]) + _varint(m)
    if m:
        header += (_varint(2 * alphabet[0] if alphabet[0] >= 0 else -2 * alphabet[0] - 1)
                   + b"".join(_varint(b - a - 1) for a, b in itertools.pairwise(alphabet))
                   + b"".join(_varint(fi - 1) for fi in freq))
    return torch.tensor(list(header + state.to_bytes(4, "little") + stream[::-1]), dtype=torch.uint8)


def rans_decode(buf: torch.Tensor, count: int) -> torch.Tensor:
    """The count int32 symbols of a rans_encode buffer; ValueError when buf is not the buffer of exactly count
    symbols (truncated, padded, miscounted or corrupt)."""
    data, pos = bytes(buf.tolist()), 0

    def take(nbytes: int) -> bytes:
        nonlocal pos
        if pos + nbytes > len(data):
            raise ValueError(f"buf: truncated rANS buffer ({len(data)} bytes, count {count})")
        pos += nbytes
        return data[pos - nbytes:pos]

    def varint() -> int:
        v, shift, more = 0, 0, True
        while more:
            b = take(1)[0]
            v |= (b & 0x7F) << shift
            shift, more = shift + 7, b >= 0x80
        if v >= 2**64:
            raise ValueError("buf: corrupt rANS header (a varint over 64 bits)")
        return v

    mode, stored = take(1)[0], varint()
    if mode > 1:
        raise ValueError(f"buf: corrupt rANS header (mode {mode})")
    if stored != count:
        raise ValueError(f"count: the buffer holds {stored} symbols, got count={count}")
    if mode == 1:
        if len(data) - pos != 4 * count:
            raise ValueError(f"buf: {len(data) - pos} bytes after the header, not the {4 * count} of raw symbols")
        return torch.tensor(struct.unpack(f"<{count}i", data[pos:]), dtype=torch.int32)
    scale_bits, m = take(1)[0], varint()
    bad_header = ValueError("buf: corrupt rANS header (bad alphabet or frequencies)")
    if not 1 <= scale_bits <= _RANS_MAX_SCALE_BITS or m > min(count, 1 << scale_bits) or (m == 0 and count > 0):
        raise bad_header
    alphabet, freq = [], []
    if m:
        u = varint()
        alphabet.append(-(u >> 1) - 1 if u & 1 else u >> 1)
        alphabet += [0] * (m - 1)
        for i in range(1, m):
            alphabet[i] = alphabet[i - 1] + varint() + 1
        freq = [varint() + 1 for _ in range(m)]
        if not -(2**31) <= alphabet[0] <= alphabet[-1] < 2**31 or sum(freq) != 1 << scale_bits:
            raise bad_header
    start = [0, *itertools.accumulate(freq)]
    state = int.from_bytes(take(4), "little")
    if not _RANS_L <= state < _RANS_L << 8:
        raise ValueError(f"buf: corrupt rANS stream (an initial state outside [2^23, 2^31): {state})")
    out = []
    for _ in range(count):
        slot = state & ((1 << scale_bits) - 1)
        j = bisect.bisect_right(start, slot) - 1
        out.append(alphabet[j])
        state = freq[j] * (state >> scale_bits) + slot - start[j]
        while state < _RANS_L:
            state = state << 8 | take(1)[0]
    if pos != len(data) or state != _RANS_L:
        raise ValueError(f"buf: corrupt rANS stream (wrong final state or trailing bytes) ({len(data)} bytes, count "
                         f"{count})")
    return torch.tensor(out, dtype=torch.int32)


# ---- a tensor's .slim payload (docs/slim-format.md): ops.quantize, then the coders chunk by chunk ----
# The coders are the native ops by default (their references are above), so what is checked here is the chunking,
# the table and the quantization around them; slim_encode's coder_backend="reference" composes only plain Python.

def _quantize_finitely(x: torch.Tensor, step: float) -> torch.Tensor:
    """ops.quantize of x flattened, refusing the first element (flat order) that has no symbol or whose q·step,
    rounded to x's dtype as slim_decode rounds it, is not finite."""
    flat = x.reshape(-1)
    y = flat.double() / step
    has_symbol = y.abs() < coding.INT32_MAX
    q = torch.round(torch.where(has_symbol, y, 0)).to(torch.int32)
    bad = (~has_symbol | ~coding.dequantize(q, step, x.dtype).isfinite()).nonzero()
    if bad.numel():
        i = int(bad[0])
        coding.quantize(flat[:i + 1], step)  # raises when flat[i] has no symbol
        dtype = str(x.dtype).removeprefix("torch.")
        raise ValueError(f"x: {float(flat[i]):g} at flat index {i} quantizes to q = {int(q[i])} and q·step = "
                         f"{int(q[i]) * step:g} overflows {dtype} (step {step:g}); use a smaller step, or coder "
                         '"raw" to store the tensor losslessly')
    return q


def _eg_table(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, ranks): the distinct values of q by descending count, ties by smaller value; each q's rank."""
    values, inverse, counts = torch.unique(q, return_inverse=True, return_counts=True)  # values ascending
    order = torch.sort(-counts, stable=True).indices  # stable: equal counts keep ascending values
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return values[order].to(torch.int32), rank[inverse].to(torch.int32)


def slim_encode(x: torch.Tensor, step: float, coder: str, chunk_numel: int, *,
                coder_backend: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    """(payload uint8, layout int64 [table_count, table_nbytes, chunk_nbytes...]) of x's symbols in chunks, each
    coded by the coder ops on coder_backend."""
    q = _quantize_finitely(x, step)
    table = torch.empty(0, dtype=torch.int32)
    if coder == "eg":
        table, q = _eg_table(q)  # q now holds ranks
    code = {"eg": lambda s: coding.eg_encode(s, 0, False, backend=coder_backend),
            "eg-signed": lambda s: coding.eg_encode(s, 0, True, backend=coder_backend),
            "rans": lambda s: coding.rans_encode(s, backend=coder_backend)}[coder]
    head = coding.eg_encode(table, 0, True, backend=coder_backend)
    chunks = [code(s) for s in q.split(chunk_numel)] if q.numel() else []
    layout = [table.numel(), head.numel()] + [c.numel() for c in chunks]
    return torch.cat([head, *chunks]), torch.tensor(layout, dtype=torch.int64)


def _dequantize_finitely(q: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """ops.dequantize, refusing the first symbol whose q·step overflows dtype."""
    out = coding.dequantize(q, step, dtype)
    bad = (~out.isfinite()).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"symbol {i}: q = {int(q[i])} times step {step:g} overflows "
                         f"{str(dtype).removeprefix('torch.')} (a step or symbol no encoder writes for this dtype)")
    return out


def slim_decode(payload: torch.Tensor, layout: torch.Tensor, numel: int, step: float, coder: str,
                chunk_numel: int, dtype: torch.dtype) -> torch.Tensor:
    """x̂ (numel,) of dtype from slim_encode's payload and layout (checked by ops.coding.check_slim_layout)."""
    table_count, table_nbytes, *sizes = layout.tolist()
    table = None
    if coder == "eg":
        try:
            table = coding.eg_decode(payload[:table_nbytes], table_count, 0, True, backend="native")
        except ValueError as e:
            raise ValueError(f"payload: the eg table: {e}") from None
    values, start = [], table_nbytes
    for c, size in enumerate(sizes):
        part, n = payload[start:start + size], min(chunk_numel, numel - c * chunk_numel)
        try:
            if coder == "rans":
                s = coding.rans_decode(part, n, backend="native")
            else:
                s = coding.eg_decode(part, n, 0, coder == "eg-signed", backend="native")
            if coder == "eg":
                if s.numel() and int(s.max()) >= table.numel():
                    raise ValueError(f"rank {int(s.max())} is outside the table of {table.numel()}")
                s = table[s.long()]
            values.append(_dequantize_finitely(s, step, dtype))
        except ValueError as e:
            raise ValueError(f"payload: chunk {c} of {len(sizes)} (bytes [{start}, {start + size})): {e}") from None
        start += size
    return torch.cat(values) if values else torch.empty(0, dtype=dtype)


def sparse_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·Wᵀ + b for a block-CSR W (ops/sparse_format.py): x [B, in] -> y [B, out].

    W is expanded to dense in ``values``' dtype; the product runs in x's dtype promoted with it
    (float64 in → float64 out: the truth), bias added last; y is returned in x's dtype.  A block stored
    twice in a row (which SparseMatrix refuses) is summed, as the native and Triton kernels sum it.
    """
    nb, r, c = values.shape
    brows, in_features = row_ptr.numel() - 1, x.shape[1]
    bcols = -(-in_features // c)
    block_rows = torch.repeat_interleave(torch.arange(brows, device=x.device), row_ptr[1:] - row_ptr[:-1])
    blocks = values.new_zeros(brows, bcols, r, c)
    cols = col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()  # int16: uint16 bits
    blocks.index_put_((block_rows, cols), values, accumulate=True)
    dense = blocks.transpose(1, 2).reshape(brows * r, bcols * c)[:out_features, :in_features]
    dtype = torch.promote_types(x.dtype, values.dtype)
    y = x.to(dtype) @ dense.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


# ---- NF4 4-bit weights (docs/qlora.md §3), bit-compatible with bitsandbytes 0.50 on the CPU ----

# The 16 NF4 code values (bitsandbytes.functional.get_4bit_type("nf4")), as float32.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 code table, float32 [16]."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 of w (any shape, float): packed uint8 [(n+1)//2, 1] and absmax float32 [ceil(n/blocksize)].

    The arithmetic of bitsandbytes' quantize_4bit (backends/default/ops.py, the kernel its CPU build runs):
    w flattened row-major into float32 blocks; absmax = max|w| per block; a full block is scaled by
    w·(1/max(absmax, 1e-38)), the last partial block by w/max(absmax, 1e-38); clamped to [-1, 1]; the code
    index is the number of code midpoints strictly below the scaled value (a tie goes to the lower code);
    element 2j in the high nibble of byte j, element 2j+1 in the low one; an odd n pads with code 7 (0.0).
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    parts, absmax = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        parts.append(torch.clamp(blocks * (1.0 / am.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1))
        absmax.append(am)
    if full < n:
        am = flat[full:].abs().amax()
        parts.append(torch.clamp(flat[full:] / am.clamp(min=1e-38), -1, 1))
        absmax.append(am.reshape(1))
    scaled = torch.cat(parts) if parts else flat
    code = nf4_code(w.device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, idx.new_full((1,), 7)])
    packed = (idx[0::2] << 4) | idx[1::2]
    absmax = torch.cat(absmax) if absmax else flat.new_empty(0)
    return packed.unsqueeze(1), absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: list[int], blocksize: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """W [shape] in ``dtype`` from NF4 ``packed`` and float32 ``absmax``: code[index]·absmax in float32, then cast
    (bitsandbytes' dequantize_4bit)."""
    n = math.prod(shape)
    bytes_ = packed.reshape(-1)
    idx = torch.stack([bytes_ >> 4, bytes_ & 15], dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (nf4_code(packed.device)[idx] * scale).reshape(shape).to(dtype)


def nf4_absmax_dequantize(qabsmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                          blocksize: int) -> torch.Tensor:
    """The double-quantized absmax: code[qabsmax]·absmax2[block] + offset, float32 [nb] (bitsandbytes'
    dequantize_blockwise, then its ``absmax += offset``)."""
    scale = absmax2.float().repeat_interleave(blocksize)[: qabsmax.numel()]
    return code.float()[qabsmax.reshape(-1).long()] * scale + offset.float().reshape(())


def nf4_lora_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int, blocksize: int,
                    lora_x: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·deq(W)ᵀ + b + scaling·(lora_x·Aᵀ)·Bᵀ, x [M, in] -> y [M, out]; lora_x None means x.

    The dtypes of bitsandbytes' Linear4bit + peft's LoRA layer: W dequantized to x's dtype, the base product
    (and bias) in x's dtype; the LoRA branch in the adapters' dtype (lora_x cast to A's dtype), cast back to x's
    dtype and added.  Differentiable in x, lora_x, A, B and bias with plain autograd; float64 inputs give
    the truth.
    """
    w = nf4_dequantize(packed, absmax, [out_features, x.shape[-1]], blocksize, x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    lx = x if lora_x is None else lora_x
    lora = torch.nn.functional.linear(torch.nn.functional.linear(lx.to(lora_A.dtype), lora_A), lora_B) * scaling
    return y + lora.to(y.dtype)


# ---- CTMC / Discrete Markov Bridge (docs/dmb.md §2–§4): the op chains of DMB's code ----
# Per position l: lam [L, V] = Λ in rank order, perm[l, y] = rank of state y, perm_inv[l, j] = state at rank j.

def ctmc_transition_rows(x0: torch.Tensor, h: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor,
                         perm_inv: torch.Tensor) -> torch.Tensor:
    """Rows x0 of exp(h·Q) [B, L, V], DMB's get_exp_row: one_hot → gather(perm_inv) → cumsum → ·exp(hΛ) →
    diff → gather(perm).  x0 [B, L] int64, h [B]; differentiable in h and lam."""
    B, L = x0.shape
    V = lam.shape[1]
    ranked = torch.nn.functional.one_hot(x0, V).to(lam.dtype).gather(-1, perm_inv.expand(B, L, V))  # 1 at rank(x0)
    v = ranked.cumsum(-1) * torch.exp(h[:, None, None] * lam)  # E_j = exp(hΛ_j) from rank(x0) on, else 0
    p = torch.diff(v, dim=-1, prepend=v.new_zeros(B, L, 1))  # rank order
    return p.gather(-1, perm.expand(B, L, V))


def ctmc_rate_cols(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, perm_inv: torch.Tensor) -> torch.Tensor:
    """Column x of Q, the rates into x [B, L, V], DMB's get_col: one_hot → gather(perm_inv) → (v_k − v_{k+1},
    last kept) → ·Λ → reverse cumsum → gather(perm)."""
    B, L = x.shape
    V = lam.shape[1]
    ranked = torch.nn.functional.one_hot(x, V).to(lam.dtype).gather(-1, perm_inv.expand(B, L, V))
    d = ranked - torch.nn.functional.pad(ranked[..., 1:], (0, 1))
    c = (d * lam).flip(-1).cumsum(-1).flip(-1)
    return c.gather(-1, perm.expand(B, L, V))


def score_entropy(logscore: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, h: torch.Tensor,
                  sigma: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, perm_inv: torch.Tensor) -> torch.Tensor:
    """Σ_l Σ_{y≠x_t} σ·Q[y, x_t]·(e^{s_y} − r_y s_y + r_y(log r_y − 1)), r_y = p(y|x0)/p(x_t|x0), per sequence [B]
    (DMB's DWDSE with the constant, docs/dmb.md §4, without its eps smoothing).  Differentiable in logscore, lam,
    h and sigma; where p(y|x0) = 0 (ranks below x0's: r_y = 0 for every lam and h) the y adds e^{s_y} and nothing
    to the lam and h gradients, so no NaN reaches the graph."""
    cond = ctmc_transition_rows(x0, h, lam, perm, perm_inv)
    col = ctmc_rate_cols(x_t, lam, perm, perm_inv)
    off = torch.ones_like(col, dtype=torch.bool).scatter(-1, x_t[..., None], False)  # y ≠ x_t
    w = sigma[:, None, None] * torch.where(off, col, 0.0)
    p_t = cond.gather(-1, x_t[..., None])
    live = off & (cond > 0) & (p_t > 0)
    # Masked entries get r = 1 before the log and the division, so neither −inf nor 0/0 reaches the backward.
    ratio = torch.where(live, cond / torch.where(p_t > 0, p_t, 1.0), 1.0)
    term = logscore.exp() + torch.where(live, ratio * (ratio.log() - 1 - logscore), 0.0)
    return (w * term).sum((1, 2))


def expm(Q: torch.Tensor) -> torch.Tensor:
    """exp(Q) for a batch [..., n, n]: torch.linalg.matrix_exp."""
    return torch.linalg.matrix_exp(Q)


def expm_multi_t(Q: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """exp(t·Q) for each t in ts [T] -> [T, n, n]: one batched torch.linalg.matrix_exp of ts·Q (ts cast to Q's
    dtype and device)."""
    return torch.linalg.matrix_exp(ts.to(Q)[:, None, None] * Q)

"""Coder streams for the fuzzer: byte mutations, rANS buffers taken apart and forged (docs/slim-format.md §7),
and the "stream" family: hand-made calls of ops.eg_decode / rans_decode / slim_decode. The encoders make valid
streams of random symbols, then one thing is forged: bytes, counts up to 2^64 (a rANS buffer claims the count
too, so only a bound on what its bytes can hold refuses it), rANS modes and tables, slim_decode's layout,
numel, step, coder and dtype, or an argument's type.
"""

from __future__ import annotations

import json
import random
import struct

import torch

from slimrate import ops

NAN, INF = float("nan"), float("inf")
HUGE = [2**31 - 1, 2**31, 2**32, 2**40, 2**48, 2**48 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
STEPS = [NAN, INF, -INF, 0.0, -0.05, 5e-324, 1e-300, 1e3, 1e5, 1e38, 1e300, 1.7e308, 1, 0, None, "0.05", True]


def mutate_bytes(rng: random.Random, data: bytearray, other: bytes) -> None:
    """One byte-level mutation of ``data`` in place; ``other`` is spliced from."""
    kind, at = rng.randrange(6), rng.randrange(len(data) + 1)
    if kind == 0 and data:
        data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
    elif kind == 1 and data:
        data[min(at, len(data) - 1)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 2:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 24])))
    elif kind == 3:
        del data[at:at + rng.choice([1, 2, 4, 8, 24, 1000])]
    elif kind == 4:
        del data[at:]
    else:
        start = rng.randrange(len(other))
        data[at:at + rng.randrange(32)] = other[start:start + rng.randrange(1, 64)]


def varint(value: int) -> bytes:
    """Unsigned LEB128 (docs/slim-format.md §1)."""
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``."""
    value = shift = 0
    while True:
        byte = buf[pos]
        value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
        if not byte & 0x80:
            return value, pos


def rans_fields(buf: bytes) -> list[list]:
    """A valid rANS buffer as [name, bytes] fields: mode, count, then (mode 0) scale, m, m alphabet varints,
    m frequency varints, state; then the stream."""
    fields, pos = [], 0

    def take(name: str, n: int | None = None) -> int:
        nonlocal pos
        value, end = (int.from_bytes(buf[pos:pos + n], "little"), pos + n) if n else _read_varint(buf, pos)
        fields.append([name, buf[pos:end]])
        pos = end
        return value

    mode = take("mode", 1)
    take("count")
    if mode == 0:
        take("scale", 1)
        m = take("m")
        for name in ["alphabet"] * m + ["freq"] * m:
            take(name)
        take("state", 4)
    fields.append(["stream", buf[pos:]])
    return fields


def forge_rans(rng: random.Random, buf: bytes, count: int | None = None) -> tuple[bytes, bool]:
    """``buf`` with one header field forged (or its count set to ``count``): (bytes, must the decoder refuse:
    the count or a frequency changed, or the stream was cut or lengthened)."""
    fields = rans_fields(buf)
    if count is not None:
        fields[1][1] = varint(count)
        return b"".join(f for _, f in fields), False
    field = rng.choice(fields)
    name, old = field
    if name in ("mode", "scale"):
        field[1] = bytes([rng.choice([0, 1, 2, 15, 16, 23, 24, 31, 0x7F, 0x80, 0xFF])])
    elif name == "state":
        field[1] = struct.pack("<I", rng.choice([0, 2**23 - 1, 2**23, 2**31 - 1, 2**31, 2**32 - 1]))
    elif name == "stream":
        cut = rng.randrange(len(old) + 1)
        field[1] = rng.choice([old[:cut], old + bytes([rng.randrange(256)]) * rng.randrange(1, 4)])
    elif rng.random() < 0.2:  # an over-long varint: redundant continuation bytes, the same value
        field[1] = bytes(b | 0x80 for b in old) + b"\x80" * rng.randrange(12) + b"\x00"
    else:
        field[1] = varint(rng.choice([0, 1, 2, 255, 2**16, 2**23, 2**31, 2**40, *HUGE]))
    changed = len(field[1]) != len(old) if name == "stream" else \
        name in ("count", "freq") and _read_varint(field[1], 0)[0] != _read_varint(old, 0)[0]
    return b"".join(f for _, f in fields), changed


def constant_rans(count: int, symbol: int = 0) -> bytes:
    """A valid rANS buffer of ``count`` copies of ``symbol``: one symbol of frequency 2^16 never moves the state
    from L = 2^23, so no stream bytes follow, whatever the count."""
    return (b"\0" + varint(count) + b"\x10" + varint(1) + varint(2 * abs(symbol) - (symbol < 0)) + varint(2**16 - 1)
            + struct.pack("<I", 2**23))


def rans_fuzz_buf(rng) -> bytes:
    """rans_encode of random symbols, at least two distinct ones (so its bytes can hold only so many)."""
    return ops.rans_encode(_symbols_tensor(rng, min_distinct=2)).numpy().tobytes()


COUNTS = [0, 1, 2**20, 2**31, 2**32, 2**40, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1]


def _symbols(rng, min_distinct: int = 1) -> list[int]:
    """0 to 400 int32 symbols: constant, small, Gaussian, anywhere in int32, or int32's extremes."""
    n = rng.choice([0, 1, 2, rng.randint(3, 40), rng.randint(41, 400)])
    pick = rng.choice([lambda: 0, lambda: rng.randint(-3, 3), lambda: int(rng.gauss(0, 30)),
                       lambda: rng.randint(-2**31 + 1, 2**31 - 1), lambda: rng.choice([-2**31 + 1, 2**31 - 1, 0])])
    symbols = [pick() for _ in range(n)]
    return [0, 1] + symbols if min_distinct > 1 else symbols


def _symbols_tensor(rng, min_distinct: int = 1) -> torch.Tensor:
    return torch.tensor(_symbols(rng, min_distinct), dtype=torch.int32)


def _tensor(data: bytes | list, dtype: str = "uint8") -> dict:
    """A tensor argument as JSON: bytes as hex, or a (nested) list of numbers."""
    return {"hex": data.hex()} if isinstance(data, bytes) else {"list": data, "dtype": dtype}


def _forge_buf(rng, buf: bytes) -> bytes:
    """``buf`` after one byte-level mutation."""
    data = bytearray(buf)
    mutate_bytes(rng, data, buf or b"\0")
    return bytes(data)


def _slim_decode_args(rng, forge: bool) -> list:
    """ops.slim_decode's arguments for a slim_encode of random values, one of them forged."""
    x = torch.tensor([rng.gauss(0, 1) for _ in range(rng.randint(0, 300))], dtype=torch.float64)
    step, coder = rng.choice([0.01, 0.3]), rng.choice(["eg", "eg-signed", "rans"])
    chunk_numel, dtype = rng.choice([1, 7, 64, 2**20]), rng.choice(["float32", "float16", "bfloat16", "float64"])
    payload, layout = (t.tolist() for t in ops.slim_encode(x, step, coder, chunk_numel))
    args = [bytes(payload), layout, x.numel(), step, coder, chunk_numel, dtype]
    at = rng.randrange(len(args)) if forge else None
    if at == 0:
        args[0] = _forge_buf(rng, args[0])
    elif at == 1:
        layout[rng.randrange(len(layout))] = rng.choice([0, -1, 1, 2**31, 2**63 - 1, -2**63])
    elif at is not None:
        args[at] = rng.choice({2: [0, 1, x.numel() + 1, x.numel() - 1, *HUGE], 3: STEPS[:13],
                               4: ["eg", "eg-signed", "rans"], 5: [1, 7, 2**20, 2**40, 2**63 - 1],
                               6: ["float16", "bfloat16", "float32"]}[at])
    return [_tensor(args[0]), _tensor(args[1], "int64"), *args[2:6], {"dtype": args[6]}]


def _coder_args(rng, op: str, forge: bool, case) -> list:
    """ops.eg_decode's or ops.rans_decode's arguments for an encoding of random symbols, forged: the bytes,
    a rANS header field, or a count up to 2^64 (rANS: claimed by the buffer too, so that only a bound on what
    its bytes can hold refuses it)."""
    signed, huge = rng.random() < 0.5, forge and rng.random() < 0.3
    symbols = _symbols_tensor(rng, min_distinct=2 if huge else 1)  # 2 symbols: the stream can hold only so many
    if not signed:
        symbols = symbols.abs()  # no symbol is -2^31
    k = rng.choice([0, 0, rng.randint(0, 31)])
    buf = (ops.eg_encode(symbols, k, signed) if op == "eg_decode" else ops.rans_encode(symbols)).numpy().tobytes()
    count = symbols.numel()
    if huge:
        count = rng.choice(COUNTS)
        if op == "rans_decode" and count >= 0:
            buf = forge_rans(rng, buf, count)[0]
    elif forge and op == "rans_decode" and rng.random() < 0.5:
        buf, case.must_refuse = forge_rans(rng, buf)
    elif forge:
        buf = _forge_buf(rng, buf)
        count = rng.choice([count, count, count - 1, count + 1, 8 * len(buf) + 1])
    args = [_tensor(buf), count] + ([k, signed] if op == "eg_decode" else [])
    if forge and op == "eg_decode" and rng.random() < 0.2:
        args[2:] = [rng.choice([0, 31, 32, -1]), not signed]
    if not forge:
        case.expect = symbols.tolist()
    return args


def stream_case(rng, files, case) -> None:
    """Fills ``case`` (a fuzz_slim_cases.Case) with one op call as JSON; 10% of calls are left unforged and must
    return the encoded symbols."""
    op = case.origin = rng.choice(["eg_decode", "rans_decode", "slim_decode"])
    forge = rng.random() < 0.9
    args = _slim_decode_args(rng, forge) if op == "slim_decode" else _coder_args(rng, op, forge, case)
    if forge and rng.random() < 0.1:
        case.type_edit = True
        args[rng.randrange(len(args))] = rng.choice([1.5, True, "3", None, [1], _tensor([1, 2], "int32"),
                                                     _tensor([[1], [2]], "uint8"), {"dtype": "int32"}])
    case.data = json.dumps({"op": op, "args": args}).encode()

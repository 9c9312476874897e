"""Case files for the C++ checks of the torch-free kernel core (csrc/tests/core_check.cpp).

A case is one op run by the Python reference backend (float64) on fresh random inputs: the inputs, the scalar
parameters, the expected outputs and a tolerance for each, in the format csrc/tests/case_file.h documents. One
function per kernel family writes its cases; FAMILIES lists them.

    python tools/core_cases.py FOLDER [--seed N]
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from slimrate import ops
from slimrate.ops import reference
from slimrate.sparse import SparseMatrix

MAGIC = b"SLRCASE1"
# csrc/tests/case_file.h's DType codes.
DTYPE_CODES = {torch.uint8: 0, torch.int8: 1, torch.uint16: 2, torch.int16: 3, torch.uint32: 4, torch.int32: 5,
               torch.uint64: 6, torch.int64: 7, torch.float16: 8, torch.bfloat16: 9, torch.float32: 10,
               torch.float64: 11}
# csrc/core/status.h's Status codes that cases expect.
STATUS = {"ok": 0.0, "bad_index": 2.0}
FLOAT_DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}


def write_case(path: Path, op: str, arrays: dict[str, torch.Tensor | float]) -> None:
    """One case file: the op whose checker runs it and its named arrays (a float is a 0-d float64 array)."""
    if sys.byteorder != "little":
        raise RuntimeError("case files hold little-endian data; write them on a little-endian machine")

    def text(s: str) -> bytes:
        data = s.encode("ascii")
        return struct.pack("<H", len(data)) + data

    out = [MAGIC, text(op), struct.pack("<I", len(arrays))]
    for name, value in arrays.items():
        t = torch.as_tensor(value, dtype=torch.float64) if isinstance(value, float) else value
        t = t.detach().cpu().contiguous()
        out += [text(name), struct.pack("<BB", DTYPE_CODES[t.dtype], t.dim()), struct.pack(f"<{t.dim()}q", *t.shape),
                t.reshape(-1).view(torch.uint8).numpy().tobytes()]
    path.write_bytes(b"".join(out))


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """‖out − ref64‖ / ‖ref64‖ in float64."""
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def flash_tol(ref_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, ulps: float = 4) -> float:
    """flash-attention's rule, as the tests apply it: 2·err(reference run in the same dtype) + a few ulps."""
    return 2 * rel_err(ref_same, ref64) + ulps * torch.finfo(dtype).eps


def listed(argument: str, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A list argument as case arrays "<argument>.0", "<argument>.1", …"""
    return {f"{argument}.{i}": t for i, t in enumerate(tensors)}


# ---- rate (csrc/core/rate.h) ----

# Odd sizes, one element, empty tensors, and one tensor over the core's 64 Ki-element chunk (kRateChunk), so
# several chunks run and their partial sums are added in order.
RATE_SHAPES = [(5, 123), (0,), (1,), (300, 257), (3, 7, 11), (4, 0)]
# rate_stats sums in float64 like the reference, in another order.
STATS_RTOL = 1e-12


def rate_params(dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """N(0, 0.05²) weights in dtype, with a few exact zeros (sign(0) = 0, and (0 + ε)^(ν−1) may be infinite)."""
    params = [(torch.randn(s, dtype=torch.float64) * 0.05).to(dtype) for s in shapes]
    for p in params:
        p.view(-1)[:3] = 0
    return params


def rate_stats_case(folder: Path, label: str, tensors: list[torch.Tensor]) -> None:
    numel, sum_abs, sum_sq = ops.rate_stats(tensors, backend="reference").tolist()
    write_case(folder / f"rate_stats-{label}.case", "rate_stats", {
        **listed("tensors", tensors),
        "expected.numel": numel, "tol.numel": 0.0,
        "expected.sum_abs": sum_abs, "tol.sum_abs": STATS_RTOL,
        "expected.sum_sq": sum_sq, "tol.sum_sq": STATS_RTOL,
    })


def power_condition(params: list[torch.Tensor], nu: float, eps: float) -> float:
    """max |(ν−1)·ln(|θ|+ε)| over the nonzero |θ|+ε: the kernels compute (|θ|+ε)^(ν−1) as exp of that product,
    so one ulp of error in it is that many ulps of the gradient (measured: 6.6 ulps at 11.3, θ = 9.5e-8)."""
    logs = [(nu - 1) * torch.log(a[a > 0]) for a in (p.double().abs() + eps for p in params)]
    return max((y.abs().max().item() for y in logs if y.numel()), default=0.0)


def rate_grad_case(folder: Path, label: str, params: list[torch.Tensor], nu: float, eps: float) -> None:
    """Tolerances as tests/test_rate_ops.py, per tensor of grads with a few ulps more where the power is
    ill-conditioned (power_condition), and for R (a sum of N terms, whose order may differ by about √N ulps)."""
    dtype = params[0].dtype if params else torch.float64
    n = sum(p.numel() for p in params)
    lam = float(max(n, 1))  # so λ·ν/N is O(1) and the update is not lost in the grad's rounding
    grads = [torch.randn_like(p) * 0.1 for p in params]
    grads64 = [g.double() for g in grads]
    r64 = ops.rate_grad_([p.double() for p in params], grads64, lam, nu, eps, backend="reference")
    grads_same = [g.clone() for g in grads]
    r_same = ops.rate_grad_(params, grads_same, lam, nu, eps, backend="reference")
    arrays = {**listed("params", params), **listed("grads", grads), "lam": lam, "nu": nu, "eps": eps,
              "expected.r": r64, "tol.r": flash_tol(r_same, r64, dtype, ulps=4 + n**0.5)}
    grad_ulps = 4 + power_condition(params, nu, eps)
    for i, (g_same, g64) in enumerate(zip(grads_same, grads64, strict=True)):
        arrays[f"expected.grads.{i}"] = g64
        arrays[f"tol.grads.{i}"] = flash_tol(g_same, g64, dtype, ulps=grad_ulps)
    write_case(folder / f"rate_grad_-{label}.case", "rate_grad_", arrays)


def rate_cases(folder: Path) -> None:
    """rate_stats and rate_grad_ in every storage dtype, then ν and ε over the rate proxy's range, then lists
    with no element."""
    for name, dtype in FLOAT_DTYPES.items():
        rate_stats_case(folder, name, rate_params(dtype, RATE_SHAPES))
        rate_grad_case(folder, name, rate_params(dtype, RATE_SHAPES), nu=0.7, eps=1e-2)
    for nu, eps in [(0.5, 1.0), (2.0, 0.0), (0.3, 0.0)]:
        rate_grad_case(folder, f"f32-nu{nu}-eps{eps}", rate_params(torch.float32, RATE_SHAPES), nu, eps)
    for label, shapes in {"no-tensors": [], "no-elements": [(0,), (4, 0)]}.items():
        rate_stats_case(folder, label, rate_params(torch.float32, shapes))
        rate_grad_case(folder, label, rate_params(torch.float32, shapes), nu=0.7, eps=1e-2)


# ---- sparse (csrc/core/sparse.h) ----

# The block shapes the kernels specialise at compile time, then two that run the generic code.
SPARSE_BLOCKS = [(1, 1), (1, 4), (1, 8), (4, 1), (8, 1), (4, 4), (2, 3), (16, 2)]
# Batch 1 (SpMV), then one tile of 16 and two tiles of 32 batch columns (SpMM; core/sparse.h's layout).
SPARSE_BATCHES = [1, 13, 40]


def sparse_weight(out: int, inp: int, sparsity: float, block: tuple[int, int], dtype: torch.dtype,
                  index: torch.dtype) -> SparseMatrix:
    """A random block-sparse [out, in] weight with ~sparsity of its blocks zeroed; col_idx as int16 (uint16 bits)
    or int32."""
    r, c = block
    keep = torch.rand(-(-out // r), -(-inp // c)) >= sparsity
    w = torch.randn(out, inp, dtype=torch.float64) * keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    sm = SparseMatrix.from_dense(w.to(dtype), block)
    if index == torch.int32:
        sm = SparseMatrix(sm.row_ptr, sm.block_columns().to(torch.int32), sm.values, sm.shape)
    return sm


def sparse_case(folder: Path, label: str, sm: SparseMatrix, batch: int, *, corrupt: bool = False) -> None:
    """x [batch, in] in the values' dtype; y against the float64 reference, with flash_tol against the reference
    run in that dtype. corrupt: one block column set to bcols (the kernels must return bad_index)."""
    out, inp = sm.shape
    x = torch.randn(batch, inp, dtype=torch.float64).to(sm.values.dtype)
    col_idx = sm.col_idx.clone()
    if corrupt:
        col_idx[col_idx.numel() // 2] = -(-inp // sm.block[1])
    y64 = reference.sparse_linear(x.double(), sm.row_ptr, sm.col_idx, sm.values.double(), out, None)
    y_same = ops.sparse_linear(x, sm, backend="reference")
    write_case(folder / f"sparse_linear-{label}.case", "sparse_linear", {
        "x": x, "row_ptr": sm.row_ptr, "col_idx": col_idx, "values": sm.values, "out_features": float(out),
        "expected.status": STATUS["bad_index" if corrupt else "ok"], "tol.status": 0.0,
        **({} if corrupt else {"expected.y": y64, "tol.y": flash_tol(y_same, y64, sm.values.dtype)}),
    })


def sparse_cases(folder: Path) -> None:
    """Every specialised block shape at batch 1 and on one and two tiles, with uint16 and int32 block columns;
    16-bit values; block columns ≥ 32768 (the uint16 bits of an int16); an empty weight; more block rows than
    one thread's grain; corrupt block columns."""
    for r, c in SPARSE_BLOCKS:
        for batch in SPARSE_BATCHES:
            for index in (torch.int16, torch.int32):
                sm = sparse_weight(37, 45, 0.7, (r, c), torch.float32, index)
                sparse_case(folder, f"{r}x{c}-b{batch}-{'u16' if index == torch.int16 else 'i32'}", sm, batch)
    for name in ("bf16", "f16"):
        for block, batch in [((1, 1), 1), ((1, 1), 13), ((4, 4), 40)]:
            sm = sparse_weight(37, 45, 0.7, block, FLOAT_DTYPES[name], torch.int16)
            sparse_case(folder, f"{block[0]}x{block[1]}-b{batch}-{name}", sm, batch)
    wide = sparse_weight(5, 40000, 0.99, (1, 1), torch.float32, torch.int16)
    for batch in (1, 5):
        sparse_case(folder, f"wide-b{batch}", wide, batch)
    sparse_case(folder, "empty-b5", sparse_weight(9, 20, 1.0, (1, 1), torch.float32, torch.int16), 5)
    big = sparse_weight(1030, 257, 0.9, (1, 1), torch.float32, torch.int16)
    for batch in (1, 70):
        sparse_case(folder, f"1030x257-b{batch}", big, batch)
    for batch in (1, 5):
        sparse_case(folder, f"corrupt-b{batch}", sparse_weight(37, 45, 0.5, (1, 4), torch.float32, torch.int16),
                    batch, corrupt=True)


# A family's function writes its cases into the folder; each runs from the same seed, so adding a family leaves
# the others' cases unchanged.
FAMILIES: dict[str, Callable[[Path], None]] = {"rate": rate_cases, "sparse": sparse_cases}


def write_cases(folder: Path, seed: int = 0) -> list[Path]:
    """Every family's cases into folder (created if missing); returns the case files."""
    folder.mkdir(parents=True, exist_ok=True)
    for write_family in FAMILIES.values():
        torch.manual_seed(seed)
        write_family(folder)
    return sorted(folder.glob("*.case"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{len(write_cases(args.folder, args.seed))} cases in {args.folder}")


if __name__ == "__main__":
    main()

"""Case files for the C++ checks of the torch-free kernel core (csrc/tests/core_check.cpp).

A case is one op run by the Python reference backend (float64) on fresh random inputs: the inputs, the scalar
parameters, the expected outputs and a tolerance for each, in the format csrc/tests/case_file.h documents. One
function per kernel family writes its cases; FAMILIES lists them (the coders' are in core_cases_coders.py, the
file writer in core_case_file.py).

    python tools/core_cases.py FOLDER [--seed N]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from core_case_file import FLOAT_DTYPES, STATUS, flash_tol, listed, write_case
from core_cases_coders import entropy_cases, slim_cases

from slimrate import ops
from slimrate.ops import reference
from slimrate.sparse import SparseMatrix

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


# ---- nf4 (csrc/core/nf4.h) ----

# (out, in, r): odd in (rows start mid-byte and mid-block), in over the fused kernels' 1024-column chunk, r = 1.
NF4_LAYERS = [(37, 45, 4), (6, 1100, 1), (130, 70, 16)]
NF4_SCALING = 2.0
# Panel bytes small enough that every thread runs several panels.
NF4_PANEL_BYTES = 4096


def nf4_layer(out: int, inp: int, r: int, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """A random NF4 weight [out, in] (packed, absmax), LoRA adapters A [r, in], B [out, r] and a bias, float32."""
    packed, absmax = ops.nf4_quantize(torch.randn(out, inp) * 0.05, blocksize, backend="reference")
    return {"packed": packed, "absmax": absmax, "lora_A": torch.randn(r, inp) / inp**0.5,
            "lora_B": torch.randn(out, r) * 0.1, "bias": torch.randn(out) * 0.1}


def nf4_linear(layer: dict[str, torch.Tensor], x: torch.Tensor, lora_x: torch.Tensor | None, grad_y: torch.Tensor,
               adapter_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, d loss / dx) of the reference layer on x (lora_x: the LoRA branch's own input, then dx has no LoRA
    term), the adapters and the bias in adapter_dtype."""
    x = x.clone().requires_grad_()
    y = ops.nf4_lora_linear(x, layer["packed"], layer["absmax"], layer["lora_A"].to(adapter_dtype),
                            layer["lora_B"].to(adapter_dtype), NF4_SCALING, layer["bias"].to(adapter_dtype),
                            lora_x=lora_x, backend="reference")
    y.backward(grad_y)
    return y.detach(), x.grad


def nf4_linear_case(folder: Path, label: str, layer: dict[str, torch.Tensor], tokens: int, dtype: torch.dtype,
                    with_lora_x: bool) -> None:
    """Forward y and the input gradient dx = g·W (+ s·(g·B)·A when the LoRA branch reads x), each for both
    schedules, against the float64 reference, with flash_tol against the reference run in dtype (float32
    adapters, as peft keeps them)."""
    out, inp = layer["lora_B"].shape[0], layer["lora_A"].shape[1]
    x, grad_y = torch.randn(tokens, inp).to(dtype), torch.randn(tokens, out).to(dtype)
    lora_x = torch.randn(tokens, inp).to(dtype) if with_lora_x else None
    y64, dx64 = nf4_linear(layer, x.double(), None if lora_x is None else lora_x.double(), grad_y.double(),
                           torch.float64)
    y_same, dx_same = nf4_linear(layer, x, lora_x, grad_y, torch.float32)
    y_tol, dx_tol = flash_tol(y_same, y64, dtype), flash_tol(dx_same, dx64, dtype)
    write_case(folder / f"nf4_linear-{label}.case", "nf4_linear", {
        "x": x, "grad_y": grad_y, **({} if lora_x is None else {"lora_x": lora_x}), **layer, "blocksize": 64.0,
        "scaling": NF4_SCALING, "panel_bytes": float(NF4_PANEL_BYTES),
        **{f"{kind}.{schedule}": value for schedule in ("fused", "panels")
           for kind, value in (("expected.y", y64), ("tol.y", y_tol), ("expected.dx", dx64), ("tol.dx", dx_tol))},
    })


def nf4_cases(folder: Path) -> None:
    """quantize, dequantize and the nested absmax bit for bit (odd sizes, a partial last block, an all-zero block);
    the linear layer's forward and input gradient on both schedules for 1, 3 and 40 tokens."""
    for name, dtype in FLOAT_DTYPES.items():
        if dtype == torch.float64:
            continue
        for blocksize, shape in [(64, (37, 45)), (128, (3, 1001)), (32, (7,))]:
            w = torch.randn(shape).to(dtype)
            w.view(-1)[:blocksize] = 0  # an all-zero block: absmax 0, code 7
            packed, absmax = ops.nf4_quantize(w, blocksize, backend="reference")
            label = f"{name}-{blocksize}-{'x'.join(map(str, shape))}"
            write_case(folder / f"nf4_quantize-{label}.case", "nf4_quantize", {
                "w": w, "blocksize": float(blocksize), "expected.packed": packed.reshape(-1), "tol.packed": 0.0,
                "expected.absmax": absmax, "tol.absmax": 0.0})
            write_case(folder / f"nf4_dequantize-{label}.case", "nf4_dequantize", {
                "packed": packed, "absmax": absmax, "blocksize": float(blocksize),
                "expected.w": ops.nf4_dequantize(packed, absmax, shape, blocksize, dtype, backend="reference"),
                "tol.w": 0.0})
    qabsmax = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    code, absmax2, offset = torch.randn(256), torch.rand(4), torch.randn(())
    write_case(folder / "nf4_absmax_dequantize.case", "nf4_absmax_dequantize", {
        "qabsmax": qabsmax, "code": code, "absmax2": absmax2, "offset": offset, "blocksize": 256.0,
        "expected.absmax": reference.nf4_absmax_dequantize(qabsmax, code, absmax2, offset, 256), "tol.absmax": 0.0})
    for out, inp, r in NF4_LAYERS:
        layer = nf4_layer(out, inp, r)
        for tokens in (1, 3, 40):
            nf4_linear_case(folder, f"{out}x{inp}-r{r}-t{tokens}-f32", layer, tokens, torch.float32, False)
    layer = nf4_layer(*NF4_LAYERS[0])
    nf4_linear_case(folder, "lora-x-distinct-t3-f32", layer, 3, torch.float32, True)
    for name in ("bf16", "f16"):
        for tokens in (3, 40):
            nf4_linear_case(folder, f"{NF4_LAYERS[2][0]}x{NF4_LAYERS[2][1]}-t{tokens}-{name}",
                            nf4_layer(*NF4_LAYERS[2]), tokens, FLOAT_DTYPES[name], False)


# ---- ctmc (csrc/core/ctmc.h) ----

# (B, L, V): rows wider than a vector block and not a multiple of it, one state, a large V, and more rows than one
# task's grain (several threads, several batch chunks in the backward).
CTMC_SHAPES = [(5, 7, 27), (2, 3, 256), (1, 1, 1), (3, 2, 17), (40, 30, 27)]
# The summed gradients of the transition rows: a few ulps (tests/test_ctmc.py's tolerance).
CTMC_GRAD_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def ctmc_structure(L: int, V: int, dtype: torch.dtype, zero_rates: float = 0.1) -> dict[str, torch.Tensor]:
    """lam, perm, perm_inv for L positions: rates a ~ U(0.05, 1.05), a fraction zero_rates of them 0 (ties in Λ)."""
    a = torch.rand(L, V - 1, dtype=torch.float64) + 0.05
    a[torch.rand(a.shape) < zero_rates] = 0.0
    perm_inv = torch.stack([torch.randperm(V) for _ in range(L)])
    return {"lam": ops.ctmc_lambda(a).to(dtype), "perm": perm_inv.argsort(1), "perm_inv": perm_inv}


def as_float64(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in arrays.items()}


def ctmc_rows_cases(folder: Path, label: str, s: dict[str, torch.Tensor], B: int) -> None:
    """ctmc_transition_rows (flash_tol against the reference in lam's dtype), its backward (autograd through the
    reference in float64) and ctmc_rate_cols (equal to the reference in lam's dtype)."""
    L, V = s["lam"].shape
    dtype = s["lam"].dtype
    x0 = torch.randint(0, V, (B, L))
    h = (torch.rand(B, dtype=torch.float64) * 3).to(dtype)
    s64 = as_float64(s)
    lam64, h64 = s64["lam"].requires_grad_(), h.double().requires_grad_()
    rows64 = ops.ctmc_transition_rows(x0, h64, lam64, s["perm"], s["perm_inv"], backend="reference")
    rows_same = ops.ctmc_transition_rows(x0, h, **s, backend="reference")
    write_case(folder / f"ctmc_transition_rows-{label}.case", "ctmc_transition_rows", {
        **s, "x0": x0, "h": h, "expected.rows": rows64, "tol.rows": flash_tol(rows_same, rows64, dtype)})
    grad = torch.randn(B, L, V, dtype=torch.float64).to(dtype)
    dlam, dh = torch.autograd.grad((rows64 * grad.double()).sum(), (lam64, h64))
    write_case(folder / f"ctmc_transition_rows_backward-{label}.case", "ctmc_transition_rows_backward", {
        **s, "x0": x0, "h": h, "grad": grad, "expected.dlam": dlam, "tol.dlam": CTMC_GRAD_RTOL[dtype],
        "expected.dh": dh, "tol.dh": CTMC_GRAD_RTOL[dtype]})
    write_case(folder / f"ctmc_rate_cols-{label}.case", "ctmc_rate_cols", {
        **s, "x": x0, "expected.cols": ops.ctmc_rate_cols(x0, **s, backend="reference"), "tol.cols": 0.0})


def score_entropy_case(folder: Path, label: str, s: dict[str, torch.Tensor], B: int, *,
                       unreachable: bool = False) -> None:
    """Loss and d loss / d logscore against autograd through the float64 reference, flash_tol against the
    reference in lam's dtype; x_t sampled from p(· | x0). unreachable: one x_t moved below x0's rank, which the
    kernel must report (its flat row index)."""
    L, V = s["lam"].shape
    dtype = s["lam"].dtype
    s64 = as_float64(s)
    x0 = torch.randint(0, V, (B, L))
    h = (torch.rand(B, dtype=torch.float64) * 2 + 0.05).to(dtype)
    p = ops.ctmc_transition_rows(x0, h.double(), **s64, backend="reference")
    x_t = torch.multinomial(p.reshape(-1, V), 1).reshape(B, L)
    sigma = (torch.rand(B, dtype=torch.float64) + 0.1).to(dtype)
    logscore = torch.randn(B, L, V, dtype=torch.float64).to(dtype)
    arrays = {**s, "logscore": logscore, "x_t": x_t, "x0": x0, "h": h, "sigma": sigma}
    if unreachable:  # x0 at the last rank, x_t at rank 1 (a nonzero rate into it): x_t lies below x0
        row = (B * L) // 2
        x0.view(-1)[row] = s["perm_inv"][row % L, V - 1]
        x_t.view(-1)[row] = s["perm_inv"][row % L, 1]
        arrays.update({"expected.unreachable": float(row), "tol.unreachable": 0.0})
    else:
        ls64, ls_same = logscore.double().requires_grad_(), logscore.clone().requires_grad_()
        loss64 = ops.score_entropy(ls64, x_t, x0, h.double(), sigma.double(), **s64, backend="reference")
        loss_same = ops.score_entropy(ls_same, x_t, x0, h, sigma, **s, backend="reference")
        (grad64,) = torch.autograd.grad(loss64.sum(), ls64)
        (grad_same,) = torch.autograd.grad(loss_same.sum(), ls_same)
        arrays.update({"expected.unreachable": -1.0, "tol.unreachable": 0.0,
                       "expected.loss": loss64, "tol.loss": flash_tol(loss_same, loss64, dtype),
                       "expected.grad": grad64, "tol.grad": flash_tol(grad_same, grad64, dtype)})
    write_case(folder / f"score_entropy-{label}.case", "score_entropy", arrays)


def ctmc_cases(folder: Path) -> None:
    """Transition rows, their backward, rate columns and the score entropy in float32 and float64 on CTMC_SHAPES;
    an unreachable x_t."""
    for name in ("f32", "f64"):
        for B, L, V in CTMC_SHAPES:
            s = ctmc_structure(L, V, FLOAT_DTYPES[name])
            ctmc_rows_cases(folder, f"{B}x{L}x{V}-{name}", s, B)
            score_entropy_case(folder, f"{B}x{L}x{V}-{name}", s, B)
    score_entropy_case(folder, "unreachable", ctmc_structure(3, 6, torch.float64, zero_rates=0.0), 4, unreachable=True)


# A family's function writes its cases into the folder; each runs from the same seed, so adding a family leaves
# the others' cases unchanged.
FAMILIES: dict[str, Callable[[Path], None]] = {
    "rate": rate_cases, "sparse": sparse_cases, "nf4": nf4_cases, "ctmc": ctmc_cases, "entropy": entropy_cases,
    "slim": slim_cases}


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

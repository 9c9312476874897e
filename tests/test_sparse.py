"""sparse_linear (native and reference backends; Triton in test_sparse_triton.py), SparseMatrix, SparseLinear,
sparsify and the runtime loader, against dense float64 products on random weights and masks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimrate import ops, runtime
from slimrate.ops import reference
from slimrate.ops.sparse import sparse_linear_unchecked
from slimrate.ops.sparse_format import index_tensor
from slimrate.sparse import SparseMatrix
from slimrate.sparse.linear import SparseLinear, sparsify

from helpers import DEVICES, DTYPE_IDS, assert_close_flash, random_sparse, skip_unless_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKS = [(1, 1), (1, 4), (1, 8), (4, 1), (8, 1), (4, 4), (2, 3), (16, 2)]  # last two: the generic kernel


def check_against_dense(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias, dtype):
    """y vs F.linear in float64 (truth) with the flash rule against F.linear run in ``dtype``."""
    ref64 = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    same = F.linear(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))
    assert y.shape == ref64.shape and y.dtype == x.dtype
    assert_close_flash(y, same, ref64, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 17, 80])
def test_sparse_linear_matches_dense(device, backend, dtype, block, batch):
    skip_unless_backend(backend, device)
    w, sm = random_sparse(37, 45, 0.7, dtype, block, device)
    x = torch.randn(batch, 45, device=device).to(dtype)
    bias = torch.randn(37, device=device).to(dtype)
    check_against_dense(ops.sparse_linear(x, sm, bias, backend=backend), x, w, bias, dtype)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 300), (300, 64)], ids=str)
def test_sparsity_extremes_and_odd_shapes(backend, sparsity, shape):
    skip_unless_backend(backend, "cpu")
    w, sm = random_sparse(*shape, sparsity)
    for batch in (1, 5):
        x = torch.randn(batch, shape[1])
        check_against_dense(ops.sparse_linear(x, sm, backend=backend), x, w, None, torch.float32)


def test_empty_rows_and_leading_dims():
    skip_unless_backend("native", "cpu")
    w, _ = random_sparse(40, 33, 0.5)
    w[::3] = 0  # every third output row is empty
    sm = SparseMatrix.from_dense(w)
    assert (sm.row_ptr[1:] - sm.row_ptr[:-1])[::3].eq(0).all()
    for shape in [(33,), (2, 3, 33), (4, 1, 2, 33)]:
        x = torch.randn(shape)
        y = ops.sparse_linear(x, sm)
        assert y.shape == (*shape[:-1], 40)
        check_against_dense(y.reshape(-1, 40), x.reshape(-1, 33), w, None, torch.float32)


def test_noncontiguous_x_and_mixed_dtypes():
    skip_unless_backend("native", "cpu")
    w, sm = random_sparse(24, 50, 0.8, torch.bfloat16, (4, 1))
    x = torch.randn(50, 9).t()  # strided view
    assert not x.is_contiguous()
    y = ops.sparse_linear(x, sm)  # fp32 activations, bf16 weights: the product is exact in fp32
    ref = F.linear(x.double(), w.double())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_large_parallel_matches_reference():
    """More block rows than one thread's grain, so several threads write disjoint rows."""
    skip_unless_backend("native", "cpu")
    w, sm = random_sparse(1030, 257, 0.9)
    for batch in (1, 70):
        x = torch.randn(batch, 257)
        check_against_dense(ops.sparse_linear(x, sm), x, w, None, torch.float32)


def test_reference_is_exact_in_float64():
    w, sm = random_sparse(9, 11, 0.5, block=(2, 4))
    x = torch.randn(3, 11, dtype=torch.float64)
    y = reference.sparse_linear(x, sm.row_ptr, sm.col_idx, sm.values.double(), 9, None)
    torch.testing.assert_close(y, x @ w.double().t(), rtol=1e-14, atol=1e-14)


def test_opcheck():
    skip_unless_backend("native", "cpu")
    _, sm = random_sparse(13, 10, 0.6, block=(4, 4))
    for x, bias in [(torch.randn(3, 10), torch.randn(13)), (torch.randn(1, 10), None)]:
        torch.library.opcheck(torch.ops.slimrate.sparse_linear.default,
                              (x, sm.row_ptr, sm.col_idx, sm.values, 13, bias))


def test_from_dense_round_trip_and_bytes():
    for block in BLOCKS:
        w, sm = random_sparse(19, 23, 0.6, block=block)
        assert torch.equal(sm.to_dense(), w)
        r, c = block
        assert sm.values.shape[1:] == (r, c) and sm.col_idx.dtype == torch.int16  # ≤ 65536 block columns
        assert sm.nbytes == sm.values.numel() * 4 + sm.col_idx.numel() * 2 + sm.row_ptr.numel() * 8


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
def test_uint16_and_int32_block_columns(backend):
    """Block columns ≥ 32768 (negative as int16 bits) and the int32 form of the same matrix."""
    skip_unless_backend(backend, "cpu")
    w, sm = random_sparse(3, 40000, 0.999)
    w[:, -1] = 1.0  # the last column, 39999, is stored as int16 -25537
    sm = SparseMatrix.from_dense(w)
    assert sm.col_idx.dtype == torch.int16 and sm.col_idx.min() < 0
    wide = SparseMatrix(sm.row_ptr, sm.block_columns().to(torch.int32), sm.values, sm.shape)
    x = torch.randn(2, 40000)
    for m in (sm, wide):
        for batch in (1, 2):
            check_against_dense(ops.sparse_linear(x[:batch], m, backend=backend), x[:batch], w, None, torch.float32)
    assert SparseMatrix.from_dense(torch.ones(1, 65537)).col_idx.dtype == torch.int32


def test_corrupt_indices_raise_not_crash():
    skip_unless_backend("native", "cpu")
    _, sm = random_sparse(8, 16, 0.3, block=(1, 4))
    x = torch.randn(2, 16)
    op = torch.ops.slimrate.sparse_linear
    bad_col = sm.col_idx.clone()
    bad_col[0] = 4  # ceil(16 / 4) = 4 block columns: 4 is one past the end
    for batch in (1, 2):
        with pytest.raises(RuntimeError, match="col_idx"):
            op(x[:batch], sm.row_ptr, bad_col, sm.values, 8, None)
    neg = sm.col_idx.clone()
    neg[-1] = -1
    with pytest.raises(RuntimeError, match="col_idx"):
        op(x, sm.row_ptr, neg, sm.values, 8, None)
    bad_ptr = sm.row_ptr.clone()
    bad_ptr[3] = bad_ptr[-1] + 5
    with pytest.raises(RuntimeError, match="row_ptr"):
        op(x, bad_ptr, sm.col_idx, sm.values, 8, None)
    with pytest.raises(RuntimeError):
        op(x, sm.row_ptr[:-1], sm.col_idx, sm.values, 8, None)  # too few block rows for 8 outputs
    for batch in (1, 3):  # blocks but no input columns: nothing may be read
        with pytest.raises(RuntimeError, match="col_idx"):
            op(torch.randn(batch, 0), sm.row_ptr, sm.col_idx, sm.values, 8, None)


def parts_of(sm: SparseMatrix, **replaced) -> dict:
    """sm's parts (row_ptr, col_idx, values, shape), some replaced."""
    return {"row_ptr": sm.row_ptr, "col_idx": sm.col_idx, "values": sm.values, "shape": sm.shape, **replaced}


def with_entry(t: torch.Tensor, index: int, value: int) -> torch.Tensor:
    out = t.clone()
    out[index] = value
    return out


def dense_8x16() -> SparseMatrix:
    """A dense 8 × 16 weight in (2, 4) blocks: 4 block rows of 4 blocks, row_ptr = [0, 4, 8, 12, 16]."""
    return SparseMatrix.from_dense(torch.randn(8, 16), (2, 4))


# The index data the native glue checks (csrc/sparse_inputs.h); off native the same checks run in Python.
CORRUPT_INDICES = {
    "col-negative": (lambda sm: parts_of(sm, col_idx=with_entry(sm.col_idx.int(), 5, -1)), "col_idx"),
    "col-past-the-end": (lambda sm: parts_of(sm, col_idx=with_entry(sm.col_idx, 5, 4)), "col_idx"),
    "row_ptr-not-from-0": (lambda sm: parts_of(sm, row_ptr=with_entry(sm.row_ptr, 0, 1)), "row_ptr"),
    "row_ptr-not-to-nblocks": (lambda sm: parts_of(sm, row_ptr=with_entry(sm.row_ptr, -1, 15)), "row_ptr"),
    "row_ptr-decreasing": (lambda sm: parts_of(sm, row_ptr=with_entry(sm.row_ptr, 1, 9)), "row_ptr"),
}


@pytest.mark.parametrize("case", list(CORRUPT_INDICES))
def test_sparse_matrix_refuses_corrupt_indices(case):
    make, name = CORRUPT_INDICES[case]
    with pytest.raises(ValueError, match=rf"^{name}: .*rebuild it with SparseMatrix.from_dense"):
        SparseMatrix(**make(dense_8x16()))


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("case", list(CORRUPT_INDICES))
def test_sparse_linear_refuses_corrupt_indices_on_every_backend(backend, case):
    """Raw parts straight to the backend (SparseLinear.forward's path): no SparseMatrix checks them first."""
    skip_unless_backend(backend, "cpu")
    make, name = CORRUPT_INDICES[case]
    parts = make(dense_8x16())
    error = RuntimeError if backend == "native" else ValueError  # the glue's TORCH_CHECK is a RuntimeError
    with pytest.raises(error, match=name):
        sparse_linear_unchecked(torch.randn(3, 16), parts["row_ptr"], parts["col_idx"], parts["values"], 8, None,
                                backend)


# Blocks stored twice or out of order in a matrix of 4 block rows of 4 blocks (col_idx[4:8] is block row 1);
# the last case has block columns >= 32768, negative as int16.
UNORDERED_COLUMNS = {
    "repeated": ([0, 1, 2, 3, 0, 2, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3],
                 r"block row 1 holds block column 2 twice \(col_idx\[5\], col_idx\[6\]\)"),
    "descending": ([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 3, 2], r"block row 3 lists block column 2 after 3"),
    "repeated-uint16": ([0, 1, 2, 3, 0, 1, 2, 3, 40000, 40000, 2, 3, 0, 1, 2, 3],
                        r"block row 2 holds block column 40000 twice"),
}


@pytest.mark.parametrize("case", list(UNORDERED_COLUMNS))
def test_sparse_matrix_refuses_repeated_or_unsorted_blocks(case):
    """Blocks stored twice used to be summed by the native and Triton kernels and overwritten by to_dense."""
    cols, match = UNORDERED_COLUMNS[case]
    width = 4 * 40001 if max(cols) >= 4 else 16
    row_ptr = torch.tensor([0, 4, 8, 12, 16])
    for col_idx in (index_tensor(torch.tensor(cols), width // 4), torch.tensor(cols, dtype=torch.int32)):
        with pytest.raises(ValueError, match=rf"^col_idx: {match}.*strictly increase.*SparseMatrix.from_dense"):
            SparseMatrix(row_ptr, col_idx, torch.randn(16, 2, 4), (8, width))


def test_sparse_matrix_accepts_empty_rows_between_blocks():
    """A row start resets the order: column 0 after column 3 is fine when a block row (even empty) starts."""
    w = torch.randn(8, 16)
    w[2:4] = 0  # block row 1 empty
    sm = SparseMatrix.from_dense(w, (2, 4))
    assert sm.row_ptr.tolist() == [0, 4, 4, 8, 12]
    rebuilt = SparseMatrix(sm.row_ptr, sm.col_idx.int(), sm.values, sm.shape)
    assert torch.equal(rebuilt.to_dense(), w)
    empty = SparseMatrix.from_dense(torch.zeros(5, 7), (2, 3))
    assert empty.nblocks == 0 and torch.equal(empty.to(dtype=torch.float16).to_dense(), torch.zeros(5, 7).half())


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_raw_sparse_linear_sums_a_block_stored_twice_on_every_backend(backend):
    """Past SparseMatrix, the op itself has one semantics for repeated blocks: their sum."""
    skip_unless_backend(backend, "cpu")
    row_ptr, col_idx = torch.tensor([0, 3, 4]), torch.tensor([1, 0, 1, 2], dtype=torch.int32)  # row 0: column 1 twice
    values = torch.randn(4, 2, 3)
    w = torch.zeros(4, 9, dtype=torch.float64)
    for k, (row, col) in enumerate([(0, 1), (0, 0), (0, 1), (1, 2)]):
        w[2 * row:2 * row + 2, 3 * col:3 * col + 3] += values[k].double()
    x = torch.randn(5, 9)
    y = sparse_linear_unchecked(x, row_ptr, col_idx, values, 4, None, backend)
    check_against_dense(y, x, w.float(), None, torch.float32)


# A SparseMatrix whose parts disagree: refused when it is made.
MISMATCHED_PARTS = {
    "shape-not-a-pair": (dict(shape=(8,)), ValueError, "shape"),
    "values-float64": (dict(values=torch.randn(16, 2, 4, dtype=torch.float64)), TypeError, "values"),
    "values-2d": (dict(values=torch.randn(16, 8)), ValueError, "values"),
    "values-empty-blocks": (dict(values=torch.randn(16, 2, 0)), ValueError, "values"),
    "col_idx-int64": (dict(col_idx=torch.zeros(16, dtype=torch.int64)), TypeError, "col_idx"),
    "col_idx-one-short": (dict(col_idx=torch.zeros(15, dtype=torch.int32)), ValueError, "col_idx"),
    "col_idx-other-device": (dict(col_idx=torch.zeros(16, dtype=torch.int32, device="meta")), ValueError,
                             "col_idx"),
    "row_ptr-int32": (dict(row_ptr=torch.zeros(5, dtype=torch.int32)), TypeError, "row_ptr"),
    "row_ptr-one-short": (dict(row_ptr=torch.zeros(4, dtype=torch.int64)), ValueError, "row_ptr"),
}


@pytest.mark.parametrize("case", list(MISMATCHED_PARTS))
def test_sparse_matrix_refuses_mismatched_parts(case):
    replaced, error, name = MISMATCHED_PARTS[case]
    with pytest.raises(error, match=rf"^{name}:"):
        SparseMatrix(**parts_of(dense_8x16(), **replaced))


def test_sparse_linear_refuses_a_part_resized_after_construction():
    sm = dense_8x16()
    sm.col_idx.resize_(15)
    with pytest.raises(ValueError, match=r"^weight.col_idx: expected a 1-D tensor of shape \(16,\)"):
        ops.sparse_linear(torch.randn(3, 16), sm)


def test_sparse_linear_module_refuses_a_state_dict_with_a_block_stored_twice():
    linear = nn.Linear(16, 8)
    module = SparseLinear.from_linear(linear, format="bsr", block=(2, 4))
    state = module.state_dict()
    state["col_idx"] = with_entry(state["col_idx"], 6, 1)  # block row 1: columns 0, 1, 1, 3
    target = SparseLinear.from_linear(nn.Linear(16, 8), format="bsr", block=(2, 4))
    before = {name: b.clone() for name, b in target.named_buffers()}
    with pytest.raises(ValueError, match=r"block row 1 holds block column 1 twice"):
        target.load_state_dict(state)
    assert all(torch.equal(b, before[name]) for name, b in target.named_buffers()), "nothing was copied"


def test_bad_arguments_raise_clear_errors():
    _, sm = random_sparse(8, 16, 0.3)
    with pytest.raises(ValueError, match="x: expected shape"):
        ops.sparse_linear(torch.randn(2, 15), sm)
    with pytest.raises(TypeError, match="x: expected float32"):
        ops.sparse_linear(torch.randn(2, 16).double(), sm)
    with pytest.raises(TypeError, match="weight: expected"):
        ops.sparse_linear(torch.randn(2, 16), torch.randn(8, 16))
    with pytest.raises(ValueError, match="bias: expected shape"):
        ops.sparse_linear(torch.randn(2, 16), sm, torch.randn(7))
    with pytest.raises(ValueError, match="block"):
        SparseMatrix.from_dense(torch.randn(4, 4), (0, 2))
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        SparseMatrix.from_dense(torch.randn(4))
    with pytest.raises(TypeError, match="weight: expected float32"):
        SparseMatrix.from_dense(torch.randn(4, 4).double())


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (4, 4)), ("bsr", (1, 8))])
def test_sparse_linear_module_matches_linear(fmt, block):
    skip_unless_backend("native", "cpu")
    linear = nn.Linear(70, 30)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.8)
    sparse = SparseLinear.from_linear(linear, format=fmt, block=block)
    x = torch.randn(4, 6, 70)
    with torch.no_grad():
        check_against_dense(sparse(x).reshape(-1, 30), x.reshape(-1, 70), linear.weight, linear.bias, torch.float32)
    # the state dict round-trips into a fresh module of another shape
    other = SparseLinear.from_linear(nn.Linear(3, 2), format=fmt, block=block)
    other.load_state_dict(sparse.state_dict())
    assert (other.in_features, other.out_features) == (70, 30)
    torch.testing.assert_close(other(x), sparse(x), rtol=0, atol=0)


def test_sparsify_replaces_sparse_layers_and_keeps_outputs():
    skip_unless_backend("native", "cpu")
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.95)
        model[2].weight.mul_(torch.rand_like(model[2].weight) > 0.3)  # 30% zeros: stays dense
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = model(x)
    decisions = sparsify(model, min_sparsity=0.5, measure=False)
    assert [d.replaced for d in decisions] == [True, False, False]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    measured = sparsify(nn.Sequential(nn.Linear(8, 8)), 0.0, measure=True, repeats=2)
    assert measured[0].dense_us > 0 and measured[0].sparse_us > 0
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, 1.5)
    with pytest.raises(TypeError, match="model"):
        sparsify(nn.Linear(3, 3))


def test_runtime_loads_slim_into_sparse_layers(tmp_path):
    skip_unless_backend("native", "cpu")
    from slimrate.models.mlp import DigitsMLP
    from slimrate.sparse.prune import prune_

    model = DigitsMLP(hidden=96).eval()
    prune_(model, 0.9)
    path = tmp_path / "m.slim"
    from slimrate import save_slim

    save_slim(model, path, step=1e-3)
    loaded = runtime.load(path, model_factory="digits", sparse=True, min_sparsity=0.5, measure=False)
    assert any(isinstance(m, SparseLinear) for m in loaded.modules())
    dense = runtime.load(path, model_factory="digits", sparse=False)
    x = runtime.MODELS["digits"].example(dense, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), dense(x), rtol=1e-5, atol=1e-5)
        # the .slim weights are the original ones quantized with step 1e-3: |error| ≤ 5e-4 per weight
        assert (dense(x) - model(x)).abs().max() < 0.05
    assert runtime.weight_bytes(loaded) < runtime.weight_bytes(dense)
    with pytest.raises(ValueError, match="model_factory"):
        runtime.load(path, model_factory="nope")
    with pytest.raises(ValueError, match="path"):
        runtime.load(tmp_path / "missing.slim", model_factory="digits")


def digits_state(hidden: int) -> dict[str, torch.Tensor]:
    from slimrate.models.mlp import DigitsMLP

    return dict(DigitsMLP(hidden=hidden).state_dict())


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("0.weight"), r"no tensor '0.weight', which the digits architecture is sized from"),
    (lambda s: s.update({"0.weight": torch.randn(5)}), r"'0.weight' has shape \(5,\), the digits .* 2 dims"),
    (lambda s: s.pop("4.bias"), r"does not fit DigitsMLP: missing 1 of its 6 tensors: \['4.bias'\]"),
    (lambda s: s.update({"extra": torch.randn(2)}), r"DigitsMLP: tensors it does not have: \['extra'\]"),
    (lambda s: s.update({"2.weight": torch.randn(5, 4)}), r"'2.weight' has shape \(5, 4\), DigitsMLP expects \(5, 5\)"),
], ids=["no-sizing-tensor", "sizing-tensor-1d", "missing", "unexpected", "wrong-shape"])
def test_runtime_load_names_the_tensor_that_does_not_fit(edit, match):
    state = digits_state(hidden=5)
    edit(state)
    with pytest.raises(ValueError, match=match):
        runtime.load(state, model_factory="digits", sparse=False)


def test_runtime_load_names_a_missing_charlm_tensor():
    with pytest.raises(ValueError, match="no tensor 'tok_emb.weight'.*charlm"):
        runtime.load(digits_state(hidden=5), model_factory="charlm", sparse=False)


def test_cli_run_bench(tmp_path, capsys):
    skip_unless_backend("native", "cpu")
    from slimrate import cli, save_slim
    from slimrate.models.mlp import DigitsMLP
    from slimrate.sparse.prune import prune_

    model = DigitsMLP(hidden=64)
    prune_(model, 0.9)
    path = tmp_path / "m.slim"
    save_slim(model, path, step=1e-3)
    assert cli.main(["run", str(path), "--arch", "digits", "--bench", "--repeats", "3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "weight memory" in out and "0.weight" not in out  # layer names are "0", "2", "4"
    assert cli.main(["run", str(tmp_path / "missing.slim"), "--arch", "digits"]) == 2


@pytest.mark.parametrize("pattern,block,fmt", [("unstructured", None, "csr"), ("block", (4, 4), "bsr"),
                                               ("block", (1, 8), "bsr"), ("n:m", None, "csr")])
def test_pruned_patterns_through_sparse_linear(pattern, block, fmt):
    """prune_ with each pattern, then SparseLinear in the matching format, against the dense pruned layer."""
    skip_unless_backend("native", "cpu")
    from slimrate.sparse.prune import prune_

    model = nn.Sequential(nn.Linear(48, 37), nn.ReLU(), nn.Linear(37, 21))
    kwargs = {"block": block} if block else {}
    prune_(model, None if pattern == "n:m" else 0.8, pattern=pattern, **kwargs)
    x = torch.randn(6, 48)
    with torch.no_grad():
        expected = model(x)
        for i in (0, 2):
            model[i] = SparseLinear.from_linear(model[i], format=fmt, block=block)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)

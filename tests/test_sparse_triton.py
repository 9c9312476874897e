"""sparse_linear on the Triton backend (slimrate/triton_kernels/sparse.py) against the float64 reference
(ops/reference.py) over random block-sparse weights. Without a GPU this runs in Triton's interpreter
(conftest.py), so shapes stay small."""

import pytest
import torch

from slimrate import ops
from slimrate.ops import reference
from slimrate.sparse import SparseMatrix

from helpers import DEVICES, DTYPE_IDS, assert_close_flash, random_sparse, skip_unless_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (16, 16) with a batch of 16 or more takes the kernel's tl.dot path; (3, 5) pads r and c to powers of two.
BLOCKS = [(1, 1), (1, 4), (8, 1), (4, 4), (3, 5), (16, 16)]
DEVICE = DEVICES[-1]  # the GPU where there is one, else the interpreter on the CPU


@pytest.fixture(autouse=True)
def _needs_triton():
    skip_unless_backend("triton", DEVICE)


def check_triton(x: torch.Tensor, sm: SparseMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the Triton backend and checks it by the flash rule: the truth is the reference on float64
    copies, the same-precision run is the reference in the inputs' own dtypes (promoted x·values)."""
    out, inp = sm.shape
    y = ops.sparse_linear(x, sm, bias, backend="triton")
    assert y.shape == (*x.shape[:-1], out) and y.dtype == x.dtype and y.device == x.device
    x2 = x.reshape(-1, inp)
    ref64 = reference.sparse_linear(x2.double(), sm.row_ptr, sm.col_idx, sm.values.double(), out,
                                    None if bias is None else bias.double())
    same = reference.sparse_linear(x2, sm.row_ptr, sm.col_idx, sm.values, out, bias)
    coarser = max(x.dtype, sm.dtype, key=lambda d: torch.finfo(d).eps)  # tolerance of the less precise input
    assert_close_flash(y.reshape(-1, out), same, ref64, coarser)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_linear_triton_matches_reference(dtype, block, batch):
    _, sm = random_sparse(37, 45, 0.6, dtype, block, DEVICE)
    x = torch.randn(batch, 45, device=DEVICE).to(dtype)
    check_triton(x, sm, torch.randn(37, device=DEVICE).to(dtype))


@pytest.mark.parametrize("block", [(1, 1), (16, 16)], ids=str)
def test_sparse_linear_triton_batch_over_one_tile(block):
    """40 batch entries: two programs per block row (tile of 32), and tl.dot for 16×16 blocks."""
    _, sm = random_sparse(50, 40, 0.5, torch.float32, block, DEVICE)
    check_triton(torch.randn(40, 40, device=DEVICE), sm, torch.randn(50, device=DEVICE))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape,block", [((13, 7), (4, 4)), ((1, 1), (1, 1)), ((5, 33), (2, 3)), ((9, 2), (1, 4))],
                         ids=str)
def test_sparse_linear_triton_odd_shapes_and_extremes(sparsity, shape, block):
    """Edge blocks past out and in (zero-padded values, x never read past in), no blocks, all blocks."""
    _, sm = random_sparse(*shape, sparsity, torch.float32, block, DEVICE)
    if sparsity == 1.0:
        assert sm.nblocks == 0
    for batch in (1, 3):
        x = torch.randn(batch, shape[1], device=DEVICE)
        check_triton(x, sm)
        check_triton(x, sm, torch.randn(shape[0], device=DEVICE))


@pytest.mark.parametrize("block", [(1, 1), (4, 2)], ids=str)
def test_sparse_linear_triton_empty_rows(block):
    w, _ = random_sparse(24, 19, 0.3, torch.float32, block, DEVICE)
    w[::3] = 0  # rows 0, 3, 6, ...: with r = 4 every block row keeps some rows, with r = 1 every third is empty
    w[8:12] = 0  # block row 2 of r = 4 is empty
    sm = SparseMatrix.from_dense(w, block)
    counts = sm.row_ptr[1:] - sm.row_ptr[:-1]
    assert counts.eq(0).any()
    for batch in (1, 3):
        check_triton(torch.randn(batch, 19, device=DEVICE), sm, torch.randn(24, device=DEVICE))


def test_sparse_linear_triton_strided_and_leading_dims():
    _, sm = random_sparse(11, 20, 0.5, torch.float32, (2, 4), DEVICE)
    transposed = torch.randn(20, 3, device=DEVICE).t()  # strides (1, 3)
    sliced = torch.randn(3, 40, device=DEVICE)[:, ::2]  # strides (40, 2)
    for x in (transposed, sliced):
        assert not x.is_contiguous()
        check_triton(x, sm)
    assert check_triton(torch.randn(20, device=DEVICE), sm).shape == (11,)
    assert check_triton(torch.randn(2, 3, 20, device=DEVICE), sm).shape == (2, 3, 11)
    assert check_triton(torch.randn(0, 20, device=DEVICE), sm).shape == (0, 11)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=lambda d: DTYPE_IDS[d])
def test_sparse_linear_triton_mixed_dtypes(x_dtype, w_dtype):
    """Weights in one dtype, activations and bias in another: the result takes x's dtype."""
    _, sm = random_sparse(21, 30, 0.5, w_dtype, (1, 4), DEVICE)
    for batch in (1, 3):
        check_triton(torch.randn(batch, 30, device=DEVICE).to(x_dtype), sm,
                     torch.randn(21, device=DEVICE, dtype=torch.float64))


def test_sparse_linear_triton_rejects_mismatched_indices():
    from slimrate.triton_kernels import sparse_linear_triton

    _, sm = random_sparse(8, 16, 0.3, torch.float32, (4, 4), DEVICE)
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="row_ptr"):
        sparse_linear_triton(x, sm.row_ptr[:-1], sm.col_idx, sm.values, 8, None)
    with pytest.raises(ValueError, match="col_idx"):
        sparse_linear_triton(x, sm.row_ptr, sm.col_idx[1:], sm.values, 8, None)
    with pytest.raises(ValueError, match="values"):
        sparse_linear_triton(x, sm.row_ptr, sm.col_idx, sm.values[0], 8, None)

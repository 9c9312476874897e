"""Block-sparse weight storage (BSR; CSR is the block (1, 1) case), built from a dense weight.

A weight W [rows, cols] (an nn.Linear's [out, in]) is cut into blocks of (r, c); partial edge blocks are
zero-padded. Only blocks with a nonzero entry are kept, row by row:
- ``values``  [nblocks, r, c] in the weight's dtype (float32, bfloat16, float16);
- ``col_idx`` [nblocks] the block column of each block, strictly increasing within a block row (so no block
  is stored twice): int16 holding uint16 bits when there are at most 65536 block columns (2 bytes per
  block), else int32;
- ``row_ptr`` [ceil(rows / r) + 1] int64, block row i owns blocks row_ptr[i] .. row_ptr[i+1]-1.
Memory: values + indices, ``nbytes`` (6 bytes per kept fp32 weight in CSR); a dense fp32 W costs 4·rows·cols.

A SparseMatrix checks all of this when it is made (``check_layout`` then ``check_index_data``), whichever
way it is made: from_dense, the constructor, ``to``, SparseLinear's buffers and its load_state_dict.
``check_sparse_matrix`` repeats the layout check in the op face (cheap: no data is read);
``check_block_indices`` checks the index data as the native kernels' glue does (csrc/sparse_inputs.h), which
does not check the order: on every backend the op sums blocks stored twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimrate.ops.checks import check_tensor

SPARSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_arg(block: object) -> tuple[int, int]:
    """``block`` as a pair of positive ints (r, c)."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"block: expected a pair of positive ints (rows, cols), e.g. (1, 1) for CSR, got {block!r}")
    return int(block[0]), int(block[1])


def index_tensor(block_cols: torch.Tensor, bcols: int) -> torch.Tensor:
    """Block columns as int16 holding uint16 bits when bcols ≤ 65536, else int32."""
    if bcols > 1 << 16:
        return block_cols.to(torch.int32)
    return torch.where(block_cols >= 1 << 15, block_cols - (1 << 16), block_cols).to(torch.int16)


def block_columns(col_idx: torch.Tensor) -> torch.Tensor:
    """int64 block columns from int32 col_idx or from int16 col_idx holding uint16 bits."""
    return col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()


@dataclass(frozen=True)
class SparseMatrix:
    """A [rows, cols] matrix in block-CSR form (see the module docstring for the layout)."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        """Refuse a matrix whose parts disagree or whose indices are corrupt, unsorted or repeated
        (ValueError/TypeError naming the part); O(nblocks + rows / r), one device-to-host synchronisation."""
        check_layout(self, "")
        nblocks, _, c = self.values.shape
        check_index_data(self.row_ptr, self.col_idx, nblocks, math.ceil(self.shape[1] / c), "ceil(cols / c)",
                         ordered=True)

    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nblocks(self) -> int:
        return int(self.col_idx.numel())

    @property
    def density(self) -> float:
        """Stored entries (incl. zeros inside kept blocks and padding) over rows·cols."""
        return self.values.numel() / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of values + col_idx + row_ptr."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.col_idx, self.row_ptr))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: tuple[int, int] = (1, 1)) -> SparseMatrix:
        """Keep the (r, c) blocks of a 2-D float32/bfloat16/float16 ``weight`` that hold a nonzero."""
        check_tensor("weight", weight, dtypes=SPARSE_DTYPES, shape=(None, None))
        r, c = block_arg(block)
        rows, cols = weight.shape
        brows, bcols = math.ceil(rows / r), math.ceil(cols / c)
        w = weight.detach()
        padded = w.new_zeros(brows * r, bcols * c)
        padded[:rows, :cols] = w
        blocks = padded.view(brows, r, bcols, c).transpose(1, 2)  # [brows, bcols, r, c]
        keep = blocks.ne(0).any(dim=3).any(dim=2)                  # [brows, bcols]
        block_rows, block_cols = keep.nonzero(as_tuple=True)       # row-major: rows ascending, cols within
        row_ptr = torch.zeros(brows + 1, dtype=torch.int64, device=w.device)
        row_ptr[1:] = keep.sum(dim=1).cumsum(0)
        values = blocks[block_rows, block_cols]  # [nblocks, r, c]
        # No block kept: indexing gives strides (1, 0, 0), which .contiguous() keeps (an empty tensor counts as
        # contiguous) and ExecuTorch refuses; a fresh empty tensor has the usual strides.
        values = values.contiguous() if values.numel() else values.new_empty(values.shape)
        return cls(row_ptr, index_tensor(block_cols, bcols), values, (int(rows), int(cols)))

    def block_columns(self) -> torch.Tensor:
        """col_idx as int64 block columns (uint16 bits read back from int16)."""
        return block_columns(self.col_idx)

    def to_dense(self) -> torch.Tensor:
        """The [rows, cols] matrix in the values' dtype."""
        r, c = self.block
        brows = self.row_ptr.numel() - 1
        bcols = math.ceil(self.shape[1] / c)
        counts = self.row_ptr[1:] - self.row_ptr[:-1]
        block_rows = torch.repeat_interleave(torch.arange(brows, device=self.device), counts)
        blocks = self.values.new_zeros(brows, bcols, r, c)
        blocks[block_rows, self.block_columns()] = self.values
        return blocks.transpose(1, 2).reshape(brows * r, bcols * c)[: self.shape[0], : self.shape[1]]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseMatrix:
        """A copy on ``device`` with values in ``dtype`` (indices keep theirs)."""
        if dtype is not None and dtype not in SPARSE_DTYPES:
            raise TypeError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
        return SparseMatrix(self.row_ptr.to(device), self.col_idx.to(device),
                            self.values.to(device=device, dtype=dtype), self.shape)


def check_sparse_matrix(weight: object) -> SparseMatrix:
    """``weight`` checked to be a SparseMatrix whose parts agree with each other and sit on one device."""
    if not isinstance(weight, SparseMatrix):
        raise TypeError(f"weight: expected a slimrate.sparse.SparseMatrix, got {type(weight).__name__}; build one "
                        "with SparseMatrix.from_dense(linear.weight)")
    return check_layout(weight, "weight.")


def check_layout(weight: SparseMatrix, prefix: str) -> SparseMatrix:
    """The shapes, dtypes and devices of ``weight``'s parts, named ``prefix`` + part in errors (no data read)."""
    shape = weight.shape
    if (not isinstance(shape, tuple) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"{prefix}shape: expected a pair of ints >= 0 (rows, cols), got {shape!r}")
    values = check_tensor(f"{prefix}values", weight.values, dtypes=SPARSE_DTYPES, shape=(None, None, None))
    nblocks, r, c = values.shape
    if r == 0 or c == 0:
        raise ValueError(f"{prefix}values: expected blocks [nblocks, r, c] with r, c > 0, got {tuple(values.shape)}")
    check_tensor(f"{prefix}col_idx", weight.col_idx, dtypes=(torch.int32, torch.int16), device=values.device,
                 shape=(nblocks,))
    check_tensor(f"{prefix}row_ptr", weight.row_ptr, dtypes=(torch.int64,), device=values.device,
                 shape=(math.ceil(shape[0] / r) + 1,))
    return weight


def check_index_data(row_ptr: torch.Tensor, col_idx: torch.Tensor, nblocks: int, bcols: int, bcols_is: str, *,
                     ordered: bool) -> None:
    """row_ptr runs from 0 to nblocks without decreasing, every block column is in [0, bcols) (``bcols_is``
    says where bcols comes from, for the message) and, when ``ordered``, block columns strictly increase
    within each block row.  Vectorised, O(nblocks + len(row_ptr)); one device-to-host synchronisation."""
    cols = block_columns(col_idx)
    flags = [row_ptr[0] != 0, row_ptr[-1] != nblocks, (row_ptr[1:] < row_ptr[:-1]).any(),
             ((cols < 0) | (cols >= bcols)).any()]
    if ordered:
        # position k > 0 must hold a larger column than k - 1 unless a block row starts at k
        starts = torch.zeros(nblocks + 1, dtype=torch.bool, device=cols.device)
        starts[row_ptr.clamp(0, nblocks)] = True
        unordered = ~starts[1:nblocks] & (cols[1:] <= cols[:-1])
        flags.append(unordered.any())
    bad = torch.stack(flags).tolist()
    rebuild = "the sparse weight is corrupt; rebuild it with SparseMatrix.from_dense"
    if bad[0] or bad[1]:
        raise ValueError(f"row_ptr: expected row_ptr[0] = 0 and row_ptr[-1] = nblocks = {nblocks}; {rebuild}")
    if bad[2]:
        raise ValueError(f"row_ptr: expected nondecreasing offsets; {rebuild}")
    if bad[3]:
        raise ValueError(f"col_idx: a block column is >= {bcols_is} = {bcols} or negative; {rebuild}")
    if ordered and bad[4]:
        k = int(unordered.nonzero()[0]) + 1
        row = int(torch.searchsorted(row_ptr, k, right=True)) - 1
        col, before = int(cols[k]), int(cols[k - 1])
        found = f"holds block column {col} twice" if col == before else f"lists block column {col} after {before}"
        raise ValueError(f"col_idx: block row {row} {found} (col_idx[{k - 1}], col_idx[{k}]); block columns must "
                         "strictly increase within a block row, each block stored once: add up (or drop) the "
                         "repeated blocks and sort each row's blocks by column, or build the matrix with "
                         "SparseMatrix.from_dense(dense_weight)")


def check_block_indices(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                        out_features: int, bias: torch.Tensor | None) -> None:
    """The index data of a block-CSR W for x [batch, in], as the native glue checks it (csrc/sparse_inputs.h):
    ``check_index_data`` with bcols = ceil(in / c), order not checked.  Takes sparse_linear's arguments."""
    nblocks, _, c = values.shape
    check_index_data(row_ptr, col_idx, nblocks, math.ceil(x.shape[1] / c), "ceil(in_features / c)", ordered=False)

"""sparse_linear beside what users run today: dense F.linear (oneDNN/MKL) and torch.sparse CSR.

y = x·Wᵀ for W [out, in] in float32, x [batch, in]; the sparse grid: shapes 4096×4096 and 11008×4096,
sparsity 50/70/80/90/95% (unstructured: a random mask, which times like magnitude pruning), batch 1, 8, 64.
Groups "sparse-<out>x<in>-b<batch>-s<percent>", rows:
- dense:     torch.nn.functional.linear(x, W) on the dense W (zeros included);
- torch-csr: W.to_sparse_csr() @ xᵀ, transposed back (torch.sparse, MKL on x86 builds);
- csr:       slimrate.ops.sparse_linear with 1×1 blocks (C++).
Block-pruned weights (whole r×c blocks zeroed, 90%): groups "sparse-block-4096x4096-b<batch>-s90", rows
dense, torch-bsr (when torch supports it on this device) and bsr-RxC for each block shape.
extra_info: weight_bytes (what the row keeps in memory for W), out, in, batch, sparsity.
Every row's output is checked against float64 before it is timed.  CUDA rows ("-k cuda") run the same
grid on the GPU when there is one.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from slimrate import ops
from slimrate.sparse import SparseMatrix

SHAPES = [(4096, 4096), (11008, 4096)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
BATCHES = [1, 8, 64]
BLOCKS = [(1, 4), (1, 8), (4, 1), (8, 1), (4, 4)]
BLOCK_SPARSITY = 0.9
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@functools.lru_cache(maxsize=2)
def weights(out: int, inp: int, sparsity: float, block: tuple[int, int], device: str):
    """(dense W, SparseMatrix) with ``sparsity`` of its r×c blocks zeroed at random; seeded."""
    gen = torch.Generator().manual_seed(out * 7 + inp + int(sparsity * 100) + 31 * block[0] + block[1])
    r, c = block
    keep = torch.rand(-(-out // r), -(-inp // c), generator=gen) >= sparsity
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    w = (torch.randn(out, inp, generator=gen) * 0.02 * mask).to(device)
    return w, SparseMatrix.from_dense(w, block)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = F.linear(x.double(), w.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, f"relative error {err:.3g} against float64"


def sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def runner(name: str, w: torch.Tensor, sm: SparseMatrix, block: tuple[int, int]):
    """(fn(x) -> y, bytes of W it keeps) for one benchmark row."""
    if name == "dense":
        return (lambda x: F.linear(x, w)), w.numel() * w.element_size()
    if name in ("torch-csr", "torch-bsr"):
        ws = w.to_sparse_csr() if name == "torch-csr" else w.to_sparse_bsr(block)
        nbytes = sum(t.numel() * t.element_size() for t in (ws.crow_indices(), ws.col_indices(), ws.values()))
        return (lambda x: (ws @ x.t()).t()), nbytes
    return (lambda x: ops.sparse_linear(x, sm)), sm.nbytes


def bench_row(benchmark, name, out, inp, batch, sparsity, block, device):
    w, sm = weights(out, inp, sparsity, block, device)
    fn, nbytes = runner(name, w, sm, block)
    x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(batch)).to(device)
    try:
        check(fn(x), x, w)
    except (RuntimeError, NotImplementedError) as e:  # e.g. torch-bsr matmul not implemented on CPU
        if name.startswith("torch"):
            pytest.skip(f"{name}: {str(e).splitlines()[0]}")
        raise
    benchmark.extra_info.update(weight_bytes=nbytes, out=out, inp=inp, batch=batch, sparsity=sparsity,
                                block=list(block), device=device)
    done = sync(device)

    def call():
        fn(x)
        done()

    benchmark.pedantic(call, rounds=20 if out * inp * batch < 2**28 else 8, warmup_rounds=2)


GRID = [(device, shape, sparsity, batch, name) for device in DEVICES for shape in SHAPES for sparsity in SPARSITIES
        for batch in BATCHES for name in ("dense", "torch-csr", "csr")]


@pytest.mark.parametrize("device,shape,sparsity,batch,name", GRID,
                         ids=[f"{d}-{o}x{i}-s{int(s * 100)}-b{b}-{n}" for d, (o, i), s, b, n in GRID])
def test_sparse_unstructured(benchmark, device, shape, sparsity, batch, name):
    out, inp = shape
    benchmark.group = f"sparse-{out}x{inp}-b{batch}-s{int(sparsity * 100)}" + ("-cuda" if device == "cuda" else "")
    benchmark.name = name
    bench_row(benchmark, name, out, inp, batch, sparsity, (1, 1), device)


BLOCK_GRID = [(device, batch, block, name) for device in DEVICES for block in BLOCKS for batch in BATCHES
              for name in ("dense", "torch-bsr", f"bsr-{block[0]}x{block[1]}")]


@pytest.mark.parametrize("device,batch,block,name", BLOCK_GRID,
                         ids=[f"{d}-b{b}-{r}x{c}-{n}" for d, b, (r, c), n in BLOCK_GRID])
def test_sparse_block(benchmark, device, batch, block, name):
    benchmark.group = (f"sparse-block{block[0]}x{block[1]}-4096x4096-b{batch}-s{int(BLOCK_SPARSITY * 100)}"
                       + ("-cuda" if device == "cuda" else ""))
    benchmark.name = name
    bench_row(benchmark, name, 4096, 4096, batch, BLOCK_SPARSITY, block, device)

"""Test helpers: readable ids, the flash-attention error rule, backend availability."""

import importlib.util

import pytest
import torch

import slimrate.backslash
from slimrate.ops import extension_available
from slimrate.sparse import SparseMatrix

# The streaming .slim writer and the lazy reader, which `slimrate compress` and `decompress` run on.
needs_slim_writer = pytest.mark.skipif(not hasattr(slimrate.backslash, "SlimWriter"),
                                       reason="needs slimrate.backslash.SlimWriter (save_slim of (name, tensor) "
                                              "pairs with metadata=)")
needs_slim_file = pytest.mark.skipif(not hasattr(slimrate.backslash, "SlimFile"),
                                     reason="needs the lazy .slim reader slimrate.backslash.SlimFile")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """‖out − ref64‖ / ‖ref64‖ in float64."""
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def assert_close_flash(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                       ulps: int = 4, what: str = "output") -> None:
    """flash-attention's rule (STYLE.md): err(kernel) ≤ 2·err(reference run in the same dtype) + a few ulps."""
    err, err_ref = rel_err(out, ref64), rel_err(ref_same, ref64)
    bound = 2 * err_ref + ulps * torch.finfo(dtype).eps
    if err > bound:
        diff = (out.double() - ref64).abs().flatten()
        i = int(diff.argmax())
        raise AssertionError(f"{what}: rel err {err:.3g} > bound {bound:.3g} (reference in {dtype}: {err_ref:.3g}); "
                             f"max abs err {diff[i]:.3g} at flat index {i}, shape {tuple(out.shape)}")


def skip_unless_backend(backend: str, device: str) -> None:
    """Skip with a reason when ``backend`` cannot run on ``device`` here."""
    if backend == "native" and not extension_available():
        pytest.skip("slimrate._C is not built")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")


def random_sparse(out: int, inp: int, sparsity: float, dtype=torch.float32, block=(1, 1), device="cpu"):
    """A dense weight with ~``sparsity`` of its (r, c) blocks zeroed at random, and its SparseMatrix."""
    r, c = block
    w = torch.randn(out, inp, dtype=torch.float64)
    keep = torch.rand(-(-out // r), -(-inp // c)) >= sparsity
    w *= keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    w = w.to(dtype=dtype, device=device)
    return w, SparseMatrix.from_dense(w, block)

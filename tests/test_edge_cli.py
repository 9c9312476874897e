"""`slimrate export`: a pruned checkpoint to a .pte program that runs in executorch.runtime like the eager model;
bad flags exit 2 with one line naming the flag."""

import pytest
import torch
from safetensors.torch import save_file

from slimrate import runtime
from slimrate.cli import main
from slimrate.models.mlp import DigitsMLP
from slimrate.ops import extension_available
from slimrate.sparse import SparseLinear, prune_, sparsify

edge = pytest.importorskip("slimrate.edge", reason="slimrate's ExecuTorch kernels are not built (make edge)",
                           exc_type=ImportError)
pytestmark = pytest.mark.skipif(not extension_available(), reason="slimrate._C is not built")


@pytest.fixture
def pruned_digits(tmp_path):
    """A DigitsMLP (hidden 32) pruned 90%, saved as safetensors; and the model."""
    model = DigitsMLP(hidden=32).eval()
    prune_(model, 0.9)
    path = tmp_path / "digits.safetensors"
    save_file(model.state_dict(), path)
    return path, model


@pytest.mark.parametrize("flags", [[], ["--format", "bsr", "--block", "8", "1"], ["--dense", "--backend", "portable"]],
                         ids=["csr", "bsr8x1", "dense-portable"])
def test_export_writes_a_program_that_matches_eager(pruned_digits, tmp_path, capsys, flags):
    path, model = pruned_digits
    out = tmp_path / "digits.pte"
    assert main(["export", str(path), "--arch", "digits", "-o", str(out), "--batch", "3", *flags]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(edge.load(out)(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_sparse_program_is_smaller_than_dense(pruned_digits, tmp_path):
    path, _ = pruned_digits
    sizes = {}
    for name, flags in [("sparse", []), ("dense", ["--dense"])]:
        out = tmp_path / f"{name}.pte"
        assert main(["export", str(path), "--arch", "digits", "-o", str(out), *flags]) == 0
        sizes[name] = out.stat().st_size
    model = runtime.load(path, model_factory="digits", sparse=False)
    sparsify(model, 0.5, measure=False)
    compact = runtime.weight_bytes(model)  # SparseLinear buffers: values, int16 columns, row_ptr, bias
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2, 4))
    assert compact <= sizes["sparse"] < 0.5 * sizes["dense"]


@pytest.mark.parametrize("flags,message", [
    (["--block", "8", "1"], "--block: csr stores 1×1 blocks"),
    (["--dense", "--format", "bsr"], "--dense: keeps every layer dense"),
    (["--backend", "cuda"], "--backend: invalid choice"),
    (["--arch", "hf:somewhere"], "--arch: invalid choice"),
], ids=["block-csr", "dense-format", "backend", "arch"])
def test_export_refuses_bad_flags(pruned_digits, tmp_path, capsys, flags, message):
    path, _ = pruned_digits
    arch = [] if "--arch" in flags else ["--arch", "digits"]
    assert main(["export", str(path), *arch, "-o", str(tmp_path / "m.pte"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimrate export: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.pte").exists()

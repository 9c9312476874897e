"""slimrate on ExecuTorch: the sparse_linear.out op, SparseLinear models exported to .pte files and run through
executorch.runtime with slimrate's kernels, against eager PyTorch on fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimrate.ops import extension_available
from slimrate.sparse import SparseLinear, SparseMatrix, prune_, sparsify

from helpers import DTYPE_IDS, assert_close_flash, random_sparse

edge = pytest.importorskip("slimrate.edge", reason="slimrate's ExecuTorch kernels are not built (make edge)",
                           exc_type=ImportError)
pytestmark = pytest.mark.skipif(not extension_available(), reason="slimrate._C is not built")

# (format, block, col_idx dtype): CSR and the 8×1 blocks of the benchmarks, with uint16 (int16) and int32 columns.
LAYOUTS = [("csr", (1, 1), torch.int16), ("csr", (1, 1), torch.int32), ("bsr", (8, 1), torch.int16),
           ("bsr", (8, 1), torch.int32)]


def sparse_layer(out: int, inp: int, block: tuple[int, int], index: torch.dtype, dtype=torch.float32,
                 sparsity: float = 0.8) -> tuple[SparseLinear, torch.Tensor]:
    """A SparseLinear with ~``sparsity`` of its blocks zero and a bias, col_idx stored as ``index``; and its dense
    weight."""
    w, sm = random_sparse(out, inp, sparsity, dtype=dtype, block=block)
    sm = SparseMatrix(sm.row_ptr, sm.col_idx.long().to(index) if index == torch.int32 else sm.col_idx, sm.values,
                      sm.shape)
    return SparseLinear(sm, torch.randn(out, dtype=dtype)).eval(), w


def sparse_mlp(block, index, dtype=torch.float32) -> tuple[nn.Module, nn.Module]:
    """37 → 64 → 19 with a ReLU, both layers sparse (odd sizes: partial blocks at the edges); and its float64
    dense twin, the reference."""
    first, w1 = sparse_layer(64, 37, block, index, dtype)
    second, w2 = sparse_layer(19, 64, block, index, dtype)
    model = nn.Sequential(first, nn.ReLU(), second).eval()
    ref = nn.Sequential(nn.Linear(37, 64), nn.ReLU(), nn.Linear(64, 19)).double().eval()
    with torch.no_grad():
        for dense, weight, sparse in ((ref[0], w1, first), (ref[2], w2, second)):
            dense.weight.copy_(weight)
            dense.bias.copy_(sparse.bias)
    return model, ref


def test_sparse_linear_out_passes_opcheck_and_matches_the_functional_op():
    for block, index in [((1, 1), torch.int16), ((8, 1), torch.int32)]:
        layer, _ = sparse_layer(13, 10, block, index)
        for x, bias in [(torch.randn(3, 10), layer.bias), (torch.randn(1, 10), None)]:
            args = (x, layer.row_ptr, layer.col_idx, layer.values, 13, bias)
            out = torch.empty(0)
            torch.ops.slimrate.sparse_linear.out(*args, out=out)
            torch.testing.assert_close(out, torch.ops.slimrate.sparse_linear(*args), rtol=0, atol=0)
            # Not test_aot_dispatch_dynamic: torch cannot functionalize a custom op whose output aliases an input
            # (it says so and stops); the out variant only appears after to_executorch's memory planning.
            torch.library.opcheck(torch.ops.slimrate.sparse_linear.out, args, {"out": torch.empty(x.shape[0], 13)},
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_sparse_linear_out_rejects_out_of_another_dtype():
    layer, _ = sparse_layer(13, 10, (1, 1), torch.int16)
    with pytest.raises(RuntimeError, match="out: expected x's dtype"):
        torch.ops.slimrate.sparse_linear.out(torch.randn(2, 10), layer.row_ptr, layer.col_idx, layer.values, 13,
                                             None, out=torch.empty(2, 13, dtype=torch.float64))


def test_kernels_are_registered_with_the_executorch_runtime():
    from executorch.runtime import Runtime

    assert "slimrate::sparse_linear.out" in Runtime.get().operator_registry.operator_names


@pytest.mark.parametrize("batch", [1, 5], ids=lambda b: f"batch={b}")
@pytest.mark.parametrize("fmt,block,index", LAYOUTS, ids=[f"{f}{b[0]}x{b[1]}-{str(i)[6:]}" for f, b, i in LAYOUTS])
def test_sparse_mlp_runs_in_executorch_like_eager(tmp_path, fmt, block, index, batch):
    model, ref = sparse_mlp(block, index)
    path = edge.export(model, (torch.randn(batch, 37),), tmp_path / "mlp.pte")
    program = edge.load(path)
    for _ in range(2):  # fresh inputs, not the example's
        x = torch.randn(batch, 37)
        with torch.no_grad():
            assert_close_flash(program(x), model(x), ref(x.double()), torch.float32, what=f"{fmt} {block} {index}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_half_precision_sparse_layer_runs_in_executorch_like_eager(tmp_path, dtype):
    layer, w = sparse_layer(21, 30, (1, 1), torch.int16, dtype)
    path = edge.export(layer, (torch.randn(3, 30, dtype=dtype),), tmp_path / "layer.pte", backend="portable")
    x = torch.randn(3, 30, dtype=dtype)
    with torch.no_grad():
        ref64 = x.double() @ w.double().t() + layer.bias.double()
        assert_close_flash(edge.load(path)(x), layer(x), ref64, dtype)


def test_layer_wider_than_65536_columns_runs_in_executorch_with_int32_columns(tmp_path):
    w, sm = random_sparse(3, 70_001, 0.99)
    layer = SparseLinear(sm).eval()
    assert layer.col_idx.dtype == torch.int32  # chosen by SparseMatrix: uint16 cannot address the columns
    x = torch.randn(1, 70_001)
    program = edge.load(edge.export(layer, (x,), tmp_path / "wide.pte"))
    x = torch.randn(1, 70_001)
    with torch.no_grad():
        assert_close_flash(program(x), layer(x), x.double() @ w.double().t(), torch.float32)


def test_layer_with_no_block_left_runs_in_executorch(tmp_path):
    linear = nn.Linear(12, 7).eval()
    with torch.no_grad():
        linear.weight.zero_()
    layer = SparseLinear.from_linear(linear, format="bsr", block=(8, 1)).eval()
    assert layer.values.shape == (0, 8, 1)
    x = torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(edge.load(edge.export(layer, (x,), tmp_path / "empty.pte"))(x),
                                   linear.bias.expand(2, 7), rtol=0, atol=0)


def test_pte_holds_the_compact_weights(tmp_path):
    layer, w = sparse_layer(256, 256, (1, 1), torch.int16, sparsity=0.9)
    dense = nn.Linear(256, 256).eval()
    with torch.no_grad():
        dense.weight.copy_(w)
    x = (torch.randn(1, 256),)
    sparse_bytes = edge.export(layer, x, tmp_path / "sparse.pte").stat().st_size
    dense_bytes = edge.export(dense, x, tmp_path / "dense.pte").stat().st_size
    compact = sum(t.nbytes for t in (layer.values, layer.col_idx, layer.row_ptr, layer.bias))
    assert compact <= sparse_bytes <= compact + 16 * 1024  # the buffers as they are, plus the program
    assert dense_bytes >= w.nbytes and sparse_bytes < 0.25 * dense_bytes


def test_digits_classifier_pruned_90_percent_exports_like_eager(tmp_path):
    from slimrate.models.mlp import DigitsMLP

    model = DigitsMLP(hidden=64).eval()
    prune_(model, 0.9)
    sparsify(model, 0.5, measure=False)
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2, 4))
    program = edge.load(edge.export(model, (torch.randn(4, 64),), tmp_path / "digits.pte"))
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)


def test_char_transformer_pruned_90_percent_exports_like_eager(tmp_path):
    from slimrate.models.char_lm import CharLM, CharLMConfig

    model = CharLM(CharLMConfig(context=16, d_model=64, n_layers=2)).eval()
    prune_(model, 0.9)
    decisions = sparsify(model, 0.5, format="bsr", block=(8, 1), measure=False)
    assert sum(d.replaced for d in decisions) == 9  # qkv, proj and the two MLP layers of each block, and the head
    program = edge.load(edge.export(model, (torch.randint(0, 27, (1, 16)),), tmp_path / "charlm.pte"))
    idx = torch.randint(0, 27, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(program(idx), model(idx), rtol=1e-4, atol=1e-4)


# (batch, heads, queries, keys, head size): one token, odd sizes, more keys than queries and fewer.
ATTENTION_SHAPES = [(1, 1, 1, 1, 8), (2, 3, 5, 5, 7), (1, 2, 4, 9, 16), (3, 2, 9, 4, 5)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_causal_attention_matches_scaled_dot_product_attention(shape):
    from slimrate.edge.attention import causal_attention_as_matmuls

    B, nh, L, S, hs = shape
    q, k, v = torch.randn(B, nh, L, hs), torch.randn(B, nh, S, hs), torch.randn(B, nh, S, hs)
    for scale in (None, 0.3):
        with causal_attention_as_matmuls():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=scale)
        ref_same = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        assert_close_flash(out, ref_same, ref64, torch.float32)


def test_causal_attention_mode_leaves_other_attention_calls_alone():
    from slimrate.edge.attention import causal_attention_as_matmuls

    q, k, v = torch.randn(3, 2, 1, 5, 8).unbind(0)
    mask = torch.randn(5, 5)
    for kwargs in ({"attn_mask": mask}, {"is_causal": False}, {"attn_mask": mask > 0}):
        with causal_attention_as_matmuls():
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=0, atol=0)


def test_char_transformer_attention_runs_in_the_xnnpack_delegate(tmp_path):
    from executorch.exir._serialize._program import deserialize_pte_binary

    from slimrate.models.char_lm import CharLM, CharLMConfig

    model = CharLM(CharLMConfig(context=16, d_model=64, n_layers=2)).eval()
    path = edge.export(model, (torch.randint(0, 27, (2, 16)),), tmp_path / "charlm.pte")
    plan = deserialize_pte_binary(path.read_bytes()).program.execution_plan[0]
    outside = {op.name for op in plan.operators}
    assert not outside & {"aten::where", "aten::eq", "aten::any", "aten::logical_not", "aten::bmm",
                          "aten::_softmax"}, f"attention ops outside the delegate: {sorted(outside)}"
    idx = torch.randint(0, 27, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(edge.load(path)(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_load_refuses_a_corrupt_or_truncated_program(tmp_path):
    model, _ = sparse_mlp((1, 1), torch.int16)
    data = edge.export(model, (torch.randn(1, 37),), tmp_path / "mlp.pte").read_bytes()
    for name, content in [("truncated.pte", data[: len(data) // 2]), ("garbage.pte", b"not a program " * 64),
                          ("empty.pte", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}: not a valid ExecuTorch program"):
            edge.load(tmp_path / name)
    with pytest.raises(ValueError, match="missing.pte is not a file"):
        edge.load(tmp_path / "missing.pte")


def test_program_refuses_inputs_of_another_shape_or_dtype(tmp_path):
    model, _ = sparse_mlp((1, 1), torch.int16)
    program = edge.load(edge.export(model, (torch.randn(2, 37),), tmp_path / "mlp.pte"))
    with pytest.raises(ValueError, match=r"inputs\[0\]: expected a tensor of shape \(2, 37\)"):
        program(torch.randn(3, 37))
    with pytest.raises(ValueError, match="inputs: .* takes 1 inputs, got 2"):
        program(torch.randn(2, 37), torch.randn(2, 37))


def test_executorch_kernel_refuses_a_corrupt_block_column(tmp_path, capfd):
    layer, _ = sparse_layer(16, 20, (1, 1), torch.int32)
    layer.col_idx[0] = 1000  # past the 20 columns; written behind SparseMatrix's checks
    program = edge.load(edge.export(layer, (torch.randn(1, 20),), tmp_path / "corrupt.pte"))
    with pytest.raises(RuntimeError, match="corrupt.pte: forward failed"):
        program(torch.randn(1, 20))
    assert "sparse_linear: col_idx: a block column is >= " in capfd.readouterr().err  # the kernel's log


@pytest.mark.parametrize("call,error,match", [
    (lambda p: edge.export(nn.Linear(4, 4).state_dict(), (torch.randn(1, 4),), p), TypeError, "module: expected"),
    (lambda p: edge.export(nn.Linear(4, 4), (torch.randn(1, 4),), p), ValueError, "module: is in training mode"),
    (lambda p: edge.export(nn.Linear(4, 4).eval(), torch.randn(1, 4), p), TypeError, r"example_inputs: .*\(x,\)"),
    (lambda p: edge.export(nn.Linear(4, 4).eval(), (torch.randn(1, 4),), p, backend="cuda"), ValueError,
     "backend: expected one of"),
    (lambda p: edge.export(nn.Linear(4, 4).eval(), (torch.randn(1, 4),), 3), TypeError, "path: expected"),
], ids=["module", "training", "example_inputs", "backend", "path"])
def test_export_rejects_bad_arguments(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path / "model.pte")
    assert not (tmp_path / "model.pte").exists()

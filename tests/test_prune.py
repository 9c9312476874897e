"""Magnitude pruning (slimrate.sparse.prune) against independent numpy references in float64.

The references rank with ``np.argsort(kind="stable")`` and walk blocks and n:m groups with plain loops,
so ties go to the earlier position as prune_ documents, and the expected masks are compared exactly."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from slimrate.sparse.prune import LayerSparsity, format_sparsity_report, prune_, sparsity_report

from helpers import DEVICES, DTYPE_IDS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPARSITIES = [0.0, 0.1, 0.5, 0.77, 1.0]


def make_linears(shapes, dtype=torch.float32, device="cpu", scales=None) -> nn.Sequential:
    """nn.Linear layers with [out, in] weights of ``shapes``, each N(0, scale²), no zeros."""
    layers = nn.Sequential(*[nn.Linear(cols, rows, dtype=dtype, device=device) for rows, cols in shapes])
    with torch.no_grad():
        for layer, scale in zip(layers, scales or [1.0] * len(shapes), strict=True):
            layer.weight.copy_(torch.randn(layer.weight.shape) * scale)
    return layers


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    return [layer.weight.detach().clone() for layer in model if isinstance(layer, nn.Linear)]


def as_f64(w: torch.Tensor) -> np.ndarray:
    return w.detach().cpu().double().numpy()


def ref_smallest(scores: np.ndarray, share: float) -> np.ndarray:
    """Flat bool mask of the round(share·N) smallest scores, ties to the earlier index."""
    mask = np.zeros(scores.size, dtype=bool)
    mask[np.argsort(scores, kind="stable")[: round(share * scores.size)]] = True
    return mask


def ref_unstructured(weights: list[np.ndarray], share: float, scope: str) -> list[np.ndarray]:
    if scope == "layer":
        return [ref_smallest(np.abs(w).ravel(), share).reshape(w.shape) for w in weights]
    pooled = ref_smallest(np.concatenate([np.abs(w).ravel() for w in weights]), share)
    per_layer = np.split(pooled, np.cumsum([w.size for w in weights])[:-1])
    return [m.reshape(w.shape) for m, w in zip(per_layer, weights, strict=True)]


def ref_block_slices(shape, block):
    """(row slice, col slice) of each (r, c) block of a [rows, cols] matrix, row-major; edge blocks partial."""
    (rows, cols), (r, c) = shape, block
    return [(slice(i, min(i + r, rows)), slice(j, min(j + c, cols)))
            for i in range(0, rows, r) for j in range(0, cols, c)]


def ref_block(weights: list[np.ndarray], share: float, scope: str, block) -> list[np.ndarray]:
    """Blocks ranked by the mean of w² over their real elements; the round(share·blocks) smallest pruned."""
    slices = [ref_block_slices(w.shape, block) for w in weights]
    scores = [np.array([np.mean(w[s] ** 2) for s in sl]) for w, sl in zip(weights, slices, strict=True)]
    if scope == "layer":
        chosen = [ref_smallest(s, share) for s in scores]
    else:
        chosen = np.split(ref_smallest(np.concatenate(scores), share), np.cumsum([s.size for s in scores])[:-1])
    masks = []
    for w, sl, pick in zip(weights, slices, chosen, strict=True):
        mask = np.zeros(w.shape, dtype=bool)
        for s, pruned in zip(sl, pick, strict=True):
            mask[s] = pruned
        masks.append(mask)
    return masks


def ref_n_m(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Each row in groups of m; a group of length L keeps its ceil(n·L/m) largest |w| (n when L = m)."""
    mask = np.zeros(w.shape, dtype=bool)
    for i in range(w.shape[0]):
        for j in range(0, w.shape[1], m):
            group = np.abs(w[i, j:j + m])
            keep = math.ceil(n * group.size / m)
            mask[i, j + np.argsort(group, kind="stable")[: group.size - keep]] = True
    return mask


def assert_pruned_as(after: torch.Tensor, before: torch.Tensor, mask: np.ndarray, what: str) -> None:
    """``after`` is ``before`` with exactly the ``mask`` entries zeroed (bit-exact elsewhere)."""
    expected = before.masked_fill(torch.from_numpy(mask).to(before.device), 0)
    bad = (after != expected).nonzero().tolist()
    assert not bad, (f"{what}: {len(bad)} of {after.numel()} entries differ from the reference mask, first at "
                     f"{bad[:5]}; dtype {after.dtype}, shape {tuple(after.shape)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_unstructured_prunes_exact_count_of_smallest(sparsity, scope, dtype, device):
    shapes = [(7, 13), (1, 1), (16, 33)]
    model = make_linears(shapes, dtype=dtype, device=device, scales=[1.0, 0.5, 0.2])
    before = weights_of(model)
    report = prune_(model, sparsity, scope=scope)
    refs = ref_unstructured([as_f64(w) for w in before], sparsity, scope)
    for layer, w, ref in zip(model, before, refs, strict=True):
        assert_pruned_as(layer.weight.detach(), w, ref, f"{scope} {sparsity}")
    if scope == "layer":
        assert [r.zeros for r in report] == [round(sparsity * r * c) for r, c in shapes]
    else:
        assert sum(r.zeros for r in report) == round(sparsity * sum(r * c for r, c in shapes))


def test_global_threshold_is_shared_across_layers_of_different_scales():
    model = make_linears([(12, 20), (9, 30), (5, 7)], scales=[10.0, 1.0, 0.1])
    before = weights_of(model)
    report = prune_(model, 0.6, scope="global")
    pruned = torch.cat([w[layer.weight == 0] for layer, w in zip(model, before, strict=True)]).abs()
    kept = torch.cat([w[layer.weight != 0] for layer, w in zip(model, before, strict=True)]).abs()
    assert pruned.max() <= kept.min(), f"pruned |w| up to {pruned.max()}, kept |w| from {kept.min()}"
    # the layer of small weights loses (nearly) everything, the large one little
    assert report[2].sparsity > report[1].sparsity > report[0].sparsity


def test_ties_are_broken_by_position_not_by_threshold():
    model = make_linears([(6, 10), (4, 5)])
    with torch.no_grad():
        for layer in model:  # integer weights: many ties in |w|
            layer.weight.copy_(torch.randint(-3, 4, layer.weight.shape).float() + 0.5)
    before = weights_of(model)
    report = prune_(model, 0.45, scope="global")
    assert sum(r.zeros for r in report) == round(0.45 * 80)
    refs = ref_unstructured([as_f64(w) for w in before], 0.45, "global")
    for layer, w, ref in zip(model, before, refs, strict=True):
        assert_pruned_as(layer.weight.detach(), w, ref, "ties")


def test_weights_already_zero_count_as_pruned():
    model = make_linears([(10, 20)])
    with torch.no_grad():
        model[0].weight.view(-1)[torch.randperm(200)[:120]] = 0   # 60% zero
    before = weights_of(model)
    report = prune_(model, 0.5, scope="layer")
    assert report[0].zeros == 120
    assert torch.equal(model[0].weight.detach(), before[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("block", [(2, 3), (4, 1), (1, 4), (3, 5), (8, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 1.0])
def test_block_pruning_zeros_whole_blocks_of_smallest_mean_square(sparsity, block, scope, device):
    shapes = [(8, 12), (7, 13), (3, 4)]                                # multiples, partial edges, smaller than a block
    model = make_linears(shapes, device=device, scales=[1.0, 0.7, 2.0])
    before = weights_of(model)
    prune_(model, sparsity, scope=scope, pattern="block", block=block)
    refs = ref_block([as_f64(w) for w in before], sparsity, scope, block)
    for layer, w, ref in zip(model, before, refs, strict=True):
        assert_pruned_as(layer.weight.detach(), w, ref, f"block {block} {scope} {sparsity}")
    nblocks = [len(ref_block_slices(s, block)) for s in shapes]
    pruned_blocks = [sum(bool((layer.weight[s] == 0).all()) for s in ref_block_slices(shape, block))
                     for layer, shape in zip(model, shapes, strict=True)]
    if scope == "layer":
        assert pruned_blocks == [round(sparsity * n) for n in nblocks]
    else:
        assert sum(pruned_blocks) == round(sparsity * sum(nblocks))


def test_block_pattern_prunes_the_matrix_view_of_a_conv_weight():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6, 2))
    conv = model[0].weight
    before = conv.detach().clone()
    report = prune_(model, 0.5, pattern="block", block=(2, 4), include=lambda name, p: name == "0.weight")
    assert [r.name for r in report] == ["0.weight"]
    ref = ref_block([as_f64(before).reshape(6, 27)], 0.5, "layer", (2, 4))[0]
    assert_pruned_as(conv.detach(), before, ref.reshape(conv.shape), "conv block")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (3, 8), (4, 4)], ids=lambda p: f"{p[0]}of{p[1]}")
@pytest.mark.parametrize("cols", [16, 13, 3, 1])
def test_n_m_keeps_the_n_largest_of_every_group(cols, n_m, dtype, device):
    n, m = n_m
    model = make_linears([(9, cols), (2, 2 * m)], dtype=dtype, device=device)
    before = weights_of(model)
    prune_(model, None, pattern="n:m", n_m=n_m)
    for layer, w in zip(model, before, strict=True):
        assert_pruned_as(layer.weight.detach(), w, ref_n_m(as_f64(w), n, m), f"n:m {n_m}")
        padded = torch.nn.functional.pad(layer.weight.detach(), (0, -w.shape[1] % m))
        assert int((padded.view(w.shape[0], -1, m) != 0).sum(-1).max()) <= n


def test_n_m_accepts_its_implied_sparsity():
    model = make_linears([(4, 8)])
    report = prune_(model, 0.5, scope="layer", pattern="n:m", n_m=(2, 4))
    assert report[0].zeros == 16


def test_report_counts_zeros_and_table_has_a_total_row():
    model = make_linears([(5, 7), (3, 5)])
    with torch.no_grad():
        model[0].weight[0, :4] = 0
        model[1].weight[:, 1] = -0.0
    report = sparsity_report(model)
    assert report == [LayerSparsity("0.weight", (5, 7), 35, 4, 4 / 35), LayerSparsity("1.weight", (3, 5), 15, 3, 0.2)]
    table = format_sparsity_report(report).splitlines()
    assert table[0].split() == ["weight", "shape", "params", "zeros", "sparsity"]
    assert table[2].split() == ["0.weight", "5x7", "35", "4", "11.43%"]
    assert table[-1].split() == ["total", "50", "7", "14.00%"]
    assert len({len(line) for line in table}) == 1, "columns are not aligned"


def test_tied_weight_is_pruned_and_reported_once():
    model = make_linears([(6, 6), (6, 6)])
    model[1].weight = model[0].weight
    before = weights_of(model)[0]
    report = prune_(model, 0.5, scope="global")
    assert [r.name for r in report] == ["0.weight"]
    assert_pruned_as(model[0].weight.detach(), before, ref_unstructured([as_f64(before)], 0.5, "layer")[0], "tied")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_prune_keeps_dtype_device_storage_and_requires_grad(dtype, requires_grad):
    model = make_linears([(8, 12)], dtype=dtype).requires_grad_(requires_grad)
    weight = model[0].weight
    ptr, bias = weight.data_ptr(), model[0].bias.detach().clone()
    prune_(model, 0.5, pattern="block", block=(2, 2))
    assert model[0].weight is weight and weight.data_ptr() == ptr
    assert (weight.dtype, weight.device, weight.requires_grad) == (dtype, torch.device("cpu"), requires_grad)
    assert torch.equal(model[0].bias.detach(), bias), "biases are not pruned"


BAD_ARGS = [
    pytest.param(dict(sparsity=-0.1), ValueError, "sparsity", id="sparsity=-0.1"),
    pytest.param(dict(sparsity=1.1), ValueError, "sparsity", id="sparsity=1.1"),
    pytest.param(dict(sparsity=float("nan")), ValueError, "sparsity", id="sparsity=nan"),
    pytest.param(dict(sparsity="half"), TypeError, "sparsity", id="sparsity=str"),
    pytest.param(dict(sparsity=None), TypeError, "sparsity.*n:m", id="sparsity=None-unstructured"),
    pytest.param(dict(scope="model"), ValueError, "scope.*'global', 'layer'", id="scope"),
    pytest.param(dict(pattern="2:4"), ValueError, "pattern.*'unstructured', 'block', 'n:m'", id="pattern"),
    pytest.param(dict(pattern="block", block=(0, 4)), ValueError, "block", id="block=(0,4)"),
    pytest.param(dict(pattern="block", block=(2,)), ValueError, "block", id="block=(2,)"),
    pytest.param(dict(pattern="n:m", n_m=(3, 2)), ValueError, "n_m", id="n_m=(3,2)"),
    pytest.param(dict(pattern="n:m", n_m=(2, 4), sparsity=0.75), ValueError, "sparsity.*implies sparsity 0.5",
                 id="n:m-sparsity"),
    pytest.param(dict(include=lambda name, p: True), ValueError, "include.*0.bias", id="include-1d"),
    pytest.param(dict(include=lambda name, p: False), ValueError, "module", id="include-none"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS)
def test_prune_rejects_bad_arguments(kwargs, error, match):
    model = make_linears([(4, 8)]).append(nn.Linear(4, 4, bias=True))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        prune_(model, **{"sparsity": 0.5, **kwargs})
    unchanged = [torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)]
    assert all(unchanged), "weights changed on error"


def test_prune_rejects_a_non_module_and_a_module_without_linears():
    with pytest.raises(TypeError, match="module"):
        prune_(torch.randn(4, 4), 0.5)
    with pytest.raises(ValueError, match="module.*no nn.Linear"):
        prune_(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5)
    with pytest.raises(TypeError, match="module"):
        sparsity_report([nn.Linear(2, 2)])

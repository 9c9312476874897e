"""End to end: a pruned model with its nn.Linear layers swapped for SparseLinear (slimrate.sparse.sparsify)
beside the same dense model, same weights, same inputs.

- digits: the demo's classifier (64-256-256-10) trained with BackSlash (λ = 100, decoupled, 1500 steps as in
  the BackSlash study), then 90% global magnitude pruning; extra_info records test accuracy dense before
  pruning, after pruning, and of the sparse model (must equal the pruned dense one).
- charlm-d512: the char transformer at a serving-like size (d = 512, 4 layers, context 128; random init, so only
  latency means something), 90% magnitude pruning per layer; one sequence of 128 tokens per call, so each
  linear layer sees 128 rows.
Groups "e2e-<model>-b<batch>", rows dense and sparse (every pruned nn.Linear swapped, measure=False);
extra_info: weight_bytes of the module, and how many layers sparsify(measure=True) would swap at this batch
(it keeps a layer dense where the sparse kernel measured slower).
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimrate import runtime
from slimrate.backslash import RateConstraint
from slimrate.models.char_lm import CharLM, CharLMConfig
from slimrate.sparse.linear import sparsify
from slimrate.sparse.prune import prune_
from slimrate.studies.tasks import TASKS, TaskConfig
from slimrate.train import TrainConfig, train

SPARSITY = 0.9


def digits_models() -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    task = TASKS["digits"](TaskConfig(), 0)
    model = task.model
    train(model, task.optimizer, task.loss_fn, task.get_batch,
          TrainConfig(steps=1500, log_every=1500, seed=0, progress=False, tensorboard=False),
          hooks=[RateConstraint(model, lam=100.0, eps=1.0, mode="decoupled")])
    model.eval()
    acc = {"test_acc_dense": task.metrics(model)["test_acc"]}
    prune_(model, SPARSITY)
    acc["test_acc_pruned"] = task.metrics(model)["test_acc"]
    sparse = copy.deepcopy(model)
    sparsify(sparse, 0.5, measure=False)
    acc["test_acc_sparse"] = task.metrics(sparse)["test_acc"]
    return model, sparse, acc


def charlm_models() -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = CharLM(CharLMConfig(context=128, d_model=512, n_heads=8, n_layers=4)).eval()
    prune_(model, SPARSITY, scope="layer")
    sparse = copy.deepcopy(model)
    sparsify(sparse, 0.5, measure=False)
    return model, sparse, {}


BUILDERS = {"digits": digits_models, "charlm-d512": charlm_models}
_CACHE: dict[str, tuple] = {}


def models(name: str):
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name]()
    return _CACHE[name]


def example(name: str, model: torch.nn.Module, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    if name == "digits":
        return torch.randn(batch, 64, generator=gen)
    return torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.context), generator=gen)


CASES = [("digits", 1), ("digits", 256), ("charlm-d512", 1)]


@pytest.mark.parametrize("variant", ["dense", "sparse"])
@pytest.mark.parametrize("name,batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_sparse_e2e(benchmark, name, batch, variant):
    dense, sparse, info = models(name)
    module = dense if variant == "dense" else sparse
    x = example(name, dense, batch)
    with torch.no_grad():
        err = (sparse(x) - dense(x)).abs().max().item()
    assert err < 1e-3, f"sparse and dense outputs differ by {err}"
    benchmark.group = f"e2e-{name}-b{batch}"
    benchmark.name = variant
    decisions = sparsify(copy.deepcopy(dense), 0.5, batch_size=batch * (x.shape[1] if name != "digits" else 1))
    benchmark.extra_info.update(backend=variant, weight_bytes=runtime.weight_bytes(module), max_abs_diff=err,
                                sparsify_swaps=f"{sum(d.replaced for d in decisions)} of {len(decisions)}", **info)
    with torch.no_grad():
        benchmark.pedantic(module, args=(x,), rounds=30, warmup_rounds=3)

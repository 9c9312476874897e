"""The rate ops on DTensors and RateConstraint under FSDP2 (fully_shard) and DDP, against one process.

One torchrun launch (2 CPU ranks, gloo) runs every case of tests/fsdp_rate_script.py; this file runs the same
cases on one plain model with the whole batch and compares.  Bad inputs run here on a 1-rank gloo group.
"""

from pathlib import Path

import fsdp_rate_script as script
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import slimrate.ops.rate_sharded
from slimrate.backslash import RateConstraint
from slimrate.ops import rate_grad_, rate_stats, reference

from helpers import assert_states_equal, finish_process, start_torchrun

SCRIPT = Path(script.__file__)
# Two ranks sum their shards' float64 partial sums in another order than one process, and each rank's loss is
# the mean of half the batch.  Measured over the cases after 5 steps: weights (size ~0.5, moved by up to 0.55)
# within 7.5e-8 absolute (2 float32 ulp), R within 1e-8 and ν within 3.4e-7 relative; a rate term scaled by the
# local instead of the global N fails every FSDP2 case.  So atol 3e-7 (4x) with rtol 1e-5.
RTOL, ATOL = 1e-5, 3e-7


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """The rank0/rank1 results of one torchrun launch of the worker."""
    out = tmp_path_factory.mktemp("fsdp")
    proc = start_torchrun([str(SCRIPT), "--out", str(out)])
    finish_process(proc, "torchrun fsdp_rate_script.py")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("placement", ["Shard(dim=0)", "Shard(dim=1)", "Replicate()"])
def test_rate_ops_on_dtensors_match_the_float64_reference_on_the_full_tensors(two_rank_results, placement):
    for rank, result in enumerate(two_rank_results):
        case = result["ops"][placement]
        full64 = [t.double() for t in case["tensors"]]
        torch.testing.assert_close(case["stats"], reference.rate_stats(full64), rtol=1e-12, atol=0,
                                   msg=lambda m, r=rank: f"rank {r} rate_stats: {m}")
        grads64 = [g.double() for g in case["grads"]]
        rate64 = reference.rate_grad_(full64, grads64, 0.7, 1.4, 0.5)
        # float32 kernel arithmetic per element, float64 sums: a few float32 ulp.
        torch.testing.assert_close(case["rate"], rate64, rtol=1e-6, atol=0)
        for got, want in zip(case["grads_after"], grads64, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
        inplace64 = [t.clone() for t in full64]
        torch.testing.assert_close(case["rate_inplace"], reference.rate_grad_(inplace64, inplace64, -0.7, 1.4, 0.5),
                                   rtol=1e-6, atol=0)
        for got, want in zip(case["inplace_after"], inplace64, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def assert_run_matches_single_process(got: dict, want: dict, what: str) -> None:
    """R and ν at every step, the constraint's N and every parameter of a 2-rank run equal one process's."""
    assert [n.removeprefix("module.") for n in got["names"]] == want["names"], what
    assert got["state"]["num_params"] == want["state"]["num_params"], what
    assert got["rates"] == pytest.approx(want["rates"], rel=RTOL), f"{what}: R per step"
    for step, (nus, want_nus) in enumerate(zip(got["nus"], want["nus"], strict=True)):
        assert nus == pytest.approx(want_nus, rel=RTOL), f"{what}: ν at step {step}"
    assert got["params"].keys() == want["params"].keys()
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("case", script.CASES, ids=lambda c: "-".join(map(str, c)))
def test_rate_constraint_under_fsdp2_matches_one_process(two_rank_results, case):
    single = script.train_case(script.build_model(), case)
    rank0, rank1 = (result["runs"][case] for result in two_rank_results)
    assert_run_matches_single_process(rank0, single, f"fully_shard {case}")
    assert_states_equal(rank0["state"], rank1["state"])  # R and ν are reduced: the same on every rank
    assert rank0["rates"] == rank1["rates"]


@pytest.mark.parametrize("case", script.DDP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rate_constraint_under_ddp_matches_one_process(two_rank_results, case):
    single = script.train_case(script.build_model(), case)
    rank0, rank1 = (result["ddp"][case] for result in two_rank_results)
    assert_run_matches_single_process(rank0, single, f"DDP {case}")
    assert_states_equal(rank0["params"], rank1["params"])  # DDP keeps the replicas identical


@pytest.fixture(scope="module")
def one_rank_mesh(tmp_path_factory):
    """A 1-D mesh over a 1-rank gloo group in this process (no port), destroyed after the module."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_rate_stats_rejects_a_plain_tensor_among_dtensors(one_rank_mesh):
    mixed = [distribute_tensor(torch.randn(3, 4), one_rank_mesh, [Shard(0)]), torch.randn(5)]
    with pytest.raises(ValueError, match=r"tensors\[1\]: expected a DTensor.*fully_shard to the root module"):
        rate_stats(mixed)


def test_rate_grad_rejects_plain_grads_for_dtensor_params(one_rank_mesh):
    p = distribute_tensor(torch.randn(3, 4), one_rank_mesh, [Shard(0)])
    with pytest.raises(ValueError, match="grads: on None, params on DeviceMesh"):
        rate_grad_([p], [torch.zeros(3, 4)], 1.0, 1.5, 1.0)


def test_rate_ops_reject_a_partial_placement(one_rank_mesh):
    partial = DTensor.from_local(torch.randn(3, 4), one_rank_mesh, [Partial()])
    with pytest.raises(ValueError, match=r"tensors\[0\]: has a Partial placement on mesh dim 0"):
        rate_stats([partial])


def test_rate_ops_reject_dtensors_on_two_meshes(one_rank_mesh):
    other = init_device_mesh("cpu", (1, 1))
    tensors = [distribute_tensor(torch.randn(3), one_rank_mesh, [Replicate()]),
               distribute_tensor(torch.randn(3), other, [Replicate(), Replicate()])]
    with pytest.raises(ValueError, match=r"tensors\[1\]: is on DeviceMesh.*reduced over one mesh"):
        rate_stats(tensors)


def test_rate_grad_rejects_grads_placed_unlike_params(one_rank_mesh):
    p = distribute_tensor(torch.randn(3, 4), one_rank_mesh, [Shard(0)])
    g = distribute_tensor(torch.randn(3, 4), one_rank_mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"grads\[0\]: placed .*Shard\(dim=1\).*sharded like their parameters"):
        rate_grad_([p], [g], 1.0, 1.5, 1.0)


def test_rate_stats_rejects_a_mesh_not_over_the_whole_world(one_rank_mesh, monkeypatch):
    t = distribute_tensor(torch.randn(3), init_device_mesh("cpu", (1, 1)), [Shard(0), Replicate()])
    monkeypatch.setattr(slimrate.ops.rate_sharded.dist, "get_world_size", lambda: 2)  # as if the mesh were a part
    with pytest.raises(ValueError, match="2-D mesh of 1 ranks in a world of 2"):
        rate_stats([t])


def test_rate_constraint_rejects_a_model_sharded_only_in_part(one_rank_mesh):
    from torch.distributed.fsdp import fully_shard

    model = script.build_model()
    fully_shard(model[0], mesh=one_rank_mesh)  # the root and the other layers stay plain
    with pytest.raises(ValueError, match=r"2.weight: is a plain tensor, 0.weight a DTensor.*apply fully_shard"):
        RateConstraint(model, lam=1.0)

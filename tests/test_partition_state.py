"""``partition_state=True`` under DDP (gloo, spawned): one owner keeps and steps each parameter.

Claims: the parameters are bitwise the replicated run's on every rank (the owner's step is
the computation every rank would do); each rank holds about 1/world of the state; a
checkpoint needs ``consolidate_state_dict()`` on every rank (``state_dict()`` alone refuses
to return a share) and then loads at any world size.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from models import DISTRIBUTED_KWARGS, make_batches, mixed_model, train_share
from torch import nn

from torch_shampoo import SOAP, NGPlus, Shampoo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 12
KWARGS = {
    **DISTRIBUTED_KWARGS,
    "ngplus-ps": DISTRIBUTED_KWARGS["ngplus"],
    "shampoo-compact": {**DISTRIBUTED_KWARGS["shampoo"], "compact_state": True},
}
FRONTS = {
    "shampoo": Shampoo,
    "shampoo-compact": Shampoo,
    "ngplus": NGPlus,
    "ngplus-ps": NGPlus,
    "soap": SOAP,
}


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _layers() -> nn.Module:
    """Eight equal layers: a model whose state can be shared out evenly."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(32, 32) for _ in range(8)))


def _scenarios(rank: int, world: int, store: str, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    batches = make_batches(STEPS)
    results: dict[str, Any] = {}
    for name in FRONTS if world == 2 else ["shampoo"]:
        for partitioned in (False, True):
            model = DDP(mixed_model())
            kwargs = dict(KWARGS[name], partition_state=partitioned)
            if name == "ngplus-ps":  # hooks on the layers: a bias shares its weight's owner
                kwargs.update(statistics="per_sample", model=model.module)
            with FRONTS[name](model.parameters(), **kwargs) as opt:
                train_share(model, opt, batches, rank, world)
            results[f"{name} {partitioned}"] = _params(model.module)
    # state bytes per rank on eight equal layers, against the replicated run
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    for partitioned in (False, True):
        model = DDP(_layers())
        with Shampoo(model.parameters(), block_size=16, partition_state=partitioned) as opt:
            for _ in range(3):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            results[f"bytes {partitioned}"] = opt.root_stats()["state_bytes"]
    if world == 2:
        results.update(_checkpoint(rank, world, folder, batches))
    else:  # the DCP checkpoint of the 2-process run, on 4
        results["dcp on 4"] = {f: _dcp_resume(rank, world, folder, f) for f in (True, False)}
    torch.save(results, f"{folder}/rank.{world}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's atexit teardown sometimes aborts spawned processes


def _checkpoint(rank: int, world: int, folder: str, batches: Any) -> dict[str, Any]:
    """Save at step 9 (the roots of step 8 due at 11: in flight), train on to 12; then a fresh
    optimizer on every rank loads the saved whole and trains steps 10-12."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    results: dict[str, Any] = {}
    model = DDP(mixed_model())
    opt = Shampoo(model.parameters(), partition_state=True, **KWARGS["shampoo"])
    train_share(model, opt, batches[:9], rank, world)
    try:
        opt.state_dict()
        results["unconsolidated"] = "returned"
    except RuntimeError as exc:
        results["unconsolidated"] = str(exc)
    for flatten in (True, False):  # DCP: every rank saves its share
        _dcp_save(model, opt, f"{folder}/dcp.{flatten}", flatten)
    opt.consolidate_state_dict()
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, f"{folder}/ckpt")
    results["bytes at save"] = opt.root_stats()["state_bytes"]
    train_share(model, opt, batches[9:], rank, world)
    opt.close()
    results["uninterrupted"] = _params(model.module)
    dist.barrier()
    saved = torch.load(f"{folder}/ckpt", weights_only=True)
    model = DDP(mixed_model(seed=1))
    model.module.load_state_dict(saved["model"])
    opt = Shampoo(model.parameters(), partition_state=True, **KWARGS["shampoo"])
    opt.load_state_dict(saved["opt"])
    results["bytes after load"] = opt.root_stats()["state_bytes"]
    results["pending after load"] = opt.root_stats()["pending_parameters"]
    train_share(model, opt, batches[9:], rank, world)
    opt.close()
    results["resumed"] = _params(model.module)
    results["dcp on 2"] = {
        flatten: _dcp_resume(rank, world, folder, flatten) for flatten in (True, False)
    }
    return results


def _dcp_save(model: nn.Module, opt: Any, checkpoint: str, flatten: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.save(state, checkpoint_id=checkpoint)


def _dcp_resume(rank: int, world: int, folder: str, flatten: bool) -> list[torch.Tensor]:
    """A fresh DDP model (a plain one in one process) and optimizer (partition_state) load the
    DCP checkpoint saved at step 9 and train steps 10-12."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model = DDP(mixed_model(seed=1)) if world > 1 else mixed_model(seed=1)
    opt = Shampoo(model.parameters(), partition_state=True, **KWARGS["shampoo"])
    state = {  # the template (DCP makes it with a zero-lr step)
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    dcp.load(state, checkpoint_id=f"{folder}/dcp.{flatten}")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=options)
    assert opt.root_stats()["state_bytes"] > 0
    train_share(model, opt, make_batches(STEPS)[9:], rank, world)
    opt.close()
    return _params(getattr(model, "module", model))


def _dcp_on_one(rank: int, store: str, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1)
    results = {flatten: _dcp_resume(0, 1, folder, flatten) for flatten in (True, False)}
    torch.save(results, f"{folder}/dcp on 1")
    dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    folder = tmp_path_factory.mktemp("partition_state")
    found = {}
    for world in (2, 4):
        store = str(folder / f"store.{world}")
        mp.spawn(_scenarios, args=(world, store, str(folder)), nprocs=world, join=True)
        found[world] = [
            torch.load(f"{folder}/rank.{world}.{r}", weights_only=True) for r in range(world)
        ]
    mp.spawn(_dcp_on_one, args=(str(folder / "store.1"), str(folder)), nprocs=1, join=True)
    found[1] = [torch.load(f"{folder}/dcp on 1", weights_only=True)]
    found[0] = [{"folder": str(folder)}]
    return found


@pytest.mark.parametrize(
    "world, name",
    [
        (2, "shampoo"),
        (2, "shampoo-compact"),
        (2, "soap"),
        (2, "ngplus"),
        (2, "ngplus-ps"),
        (4, "shampoo"),
    ],
)
def test_partitioned_state_is_bitwise_the_replicated_run(
    runs: dict[int, list[dict[str, Any]]], world: int, name: str
) -> None:
    start = _params(mixed_model())
    for rank in runs[world]:
        for a, b in zip(rank[f"{name} True"], runs[world][0][f"{name} False"]):
            assert torch.equal(a, b)
        assert not torch.equal(rank[f"{name} True"][0], start[0])  # it trained


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_holds_about_one_world_th_of_the_state(
    runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    replicated = runs[world][0]["bytes False"]
    shares = [rank["bytes True"] for rank in runs[world]]
    assert all(r["bytes False"] == replicated for r in runs[world])
    assert max(shares) <= 1.2 * replicated / world, (shares, replicated)
    assert sum(shares) >= replicated * 0.99  # shared out, not dropped


def test_state_dict_refuses_a_share_and_consolidated_it_resumes_bitwise(
    runs: dict[int, list[dict[str, Any]]],
) -> None:
    assert any(rank["pending after load"] > 0 for rank in runs[2])  # roots in flight
    for rank in runs[2]:
        assert "consolidate_state_dict() on every rank" in rank["unconsolidated"]
        assert rank["bytes after load"] == rank["bytes at save"]  # each kept its own share
        for a, b in zip(rank["resumed"], rank["uninterrupted"]):
            assert torch.equal(a, b)


def test_a_consolidated_checkpoint_resumes_in_one_process(
    runs: dict[int, list[dict[str, Any]]],
) -> None:
    """The whole state loads without a process group; the continuation equals the 2-process
    run to 1e-6 at ε = 1e-4 (the mean of two half-batch gradients rounds differently)."""
    saved = torch.load(f"{runs[0][0]['folder']}/ckpt", weights_only=True)
    model = mixed_model(seed=1)
    model.load_state_dict(saved["model"])
    with Shampoo(model.parameters(), **KWARGS["shampoo"]) as opt:
        opt.load_state_dict(saved["opt"])
        assert opt.root_stats()["pending_parameters"] > 0  # the roots in flight at the save
        train_share(model, opt, make_batches(STEPS)[9:], 0, 1)
    for a, b in zip(_params(model), runs[2][0]["uninterrupted"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_partition_state_is_a_bool_and_a_no_op_in_one_process() -> None:
    with pytest.raises(TypeError, match="Invalid partition_state: 1"):
        Shampoo([nn.Parameter(torch.ones(2, 2))], partition_state=1)  # type: ignore[arg-type]
    # one process: nothing to share, state_dict() as usual
    p = nn.Parameter(torch.ones(3, 2))
    with Shampoo([p], partition_state=True) as opt:
        p.grad = torch.ones(3, 2)
        opt.step()
        assert opt.state_dict()["state"][0]["step"] == 1


def test_a_dcp_checkpoint_of_shares_resumes_on_2_bitwise_and_on_4_and_1(
    runs: dict[int, list[dict[str, Any]]],
) -> None:
    """Saved with ``torch.distributed.checkpoint`` without consolidating (every rank its share,
    roots in flight), flattened and nested; each rank of the new world loads its own
    parameters' entries. On 2 processes the continuation is bitwise the uninterrupted run's; on
    4 (other owners) and 1 it equals it to 1e-6 (the mean gradient rounds differently)."""
    uninterrupted = runs[2][0]["uninterrupted"]
    for flatten in (True, False):
        for rank in runs[2]:
            for a, b in zip(rank["dcp on 2"][flatten], uninterrupted):
                assert torch.equal(a, b)
        for resumed in [r["dcp on 4"][flatten] for r in runs[4]] + [runs[1][0][flatten]]:
            for a, b in zip(resumed, uninterrupted):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

"""Multi-process training on CPU (gloo, spawned processes): what holds today.

Under DDP every rank computes the same statistics from the same averaged gradients; the only
per-process input left is timing, which the ``"auto"`` staleness fits. These tests check that
the ranks stay bitwise identical with the defaults (async roots, ``"auto"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from models import make_batches, mixed_model

from torch_shampoo import Shampoo

FREQUENCY = 8
PIN = {"stagger_roots": False}
"""("auto" staggers in one process, not in several: one schedule for every world size.)"""


def _ddp_shampoo(rank: int, store: str, out: str) -> None:
    """Async Shampoo and SOAP with the defaults (``"auto"`` staleness) on a DDP model, each
    rank on its half of every batch; saves the parameters and the fitted staleness to
    ``out``.rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from torch_shampoo import SOAP

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    found = {}
    for front, make in (("shampoo", Shampoo), ("soap", SOAP)):
        model = DistributedDataParallel(mixed_model())
        kwargs = dict(lr=0.01, block_size=16, precondition_frequency=FREQUENCY)
        with make(model.parameters(), **kwargs) as opt:  # type: ignore[arg-type]
            for x, y in make_batches(20):
                half = x.shape[0] // 2
                lo = rank * half
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[lo : lo + half]), y[lo : lo + half])
                loss.backward()
                opt.step()
            fitted = opt.param_groups[0].get("fitted_staleness")
        params = [p.detach() for p in model.module.parameters()]
        found[front] = {"params": params, "fitted": fitted}
    torch.save(found, f"{out}.{rank}")
    dist.destroy_process_group()
    os._exit(0)  # gloo's atexit teardown sometimes aborts spawned processes


def test_under_ddp_auto_staleness_is_the_same_on_every_rank(tmp_path: Path) -> None:
    """Each process would fit "auto" from its own timings (without this rule two ranks fitted
    6 and 4, then 3 and 4, and drifted apart); with several processes every rank takes the
    frequency, so all install their roots at the same steps and stay bitwise identical
    (Shampoo and SOAP)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path / "rank")
    mp.spawn(_ddp_shampoo, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    found = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for front in ("shampoo", "soap"):
        ranks = [f[front] for f in found]
        assert [r["fitted"] for r in ranks] == [FREQUENCY, FREQUENCY]
        for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
            assert torch.equal(a, b)
        assert not torch.equal(ranks[0]["params"][0], mixed_model().conv.weight.detach())


# ----------------------------------------------------------------- partitioned root work


def _partitioned(rank: int, world: int, store: str, out: str) -> None:
    """Per front end: the same DDP run with and without ``partition_roots``; then a partitioned
    run checkpointed by rank 0 alone with roots in flight and resumed by every rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from torch_shampoo import SOAP, NGPlus

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    fronts = {
        "shampoo": lambda ps, **kw: Shampoo(ps, lr=0.01, block_size=16, **PIN, **kw),
        "soap": lambda ps, **kw: SOAP(ps, lr=0.01, block_size=16, eigh_every=2, **PIN, **kw),
        "ngplus": lambda ps, **kw: NGPlus(ps, lr=0.01, block_size=16, **PIN, **kw),
    }
    batches = make_batches(12)

    def run(make, model, opt, part):  # type: ignore[no-untyped-def]
        for x, y in part:
            share = x.shape[0] // world
            lo = rank * share
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[lo : lo + share]), y[lo : lo + share]).backward()
            opt.step()

    results: dict[str, object] = {}
    for name, make in fronts.items():
        common = dict(precondition_frequency=4, root_staleness=3)
        if name == "ngplus":
            common = dict(inverse_frequency=4, root_staleness=3)
        for partition in (False, True):
            model = DistributedDataParallel(mixed_model())
            with make(model.parameters(), partition_roots=partition, **common) as opt:
                run(make, model, opt, batches)
                solved = opt.root_stats()["roots_solved_here"]
                computed = opt.root_stats()["roots_computed"]
            params = [p.detach().clone() for p in model.module.parameters()]
            results[f"{name}.{partition}"] = (params, solved, computed)
        # rank 0 alone saves at step 9 (the roots of step 8 are due at 11), everyone resumes
        model = DistributedDataParallel(mixed_model())
        opt = make(model.parameters(), partition_roots=True, **common)
        run(make, model, opt, batches[:9])
        path = f"{out}.{name}.ckpt"
        if rank == 0:
            saved = opt.state_dict()
            assert any(int(s["pending_due"]) == 11 for s in saved["state"].values())
            torch.save(saved, path)
        dist.barrier()
        opt.close()
        resumed = make(model.parameters(), partition_roots=True, **common)
        resumed.load_state_dict(torch.load(path, weights_only=True))
        run(make, model, resumed, batches[9:])
        resumed.close()
        results[f"{name}.resumed"] = [p.detach().clone() for p in model.module.parameters()]
    # one process on the combined batch, against partitioned DDP (Shampoo, ε = 1e-4; SOAP's
    # eigenbases of nearly degenerate factors turn rounding differences into O(lr) ones)
    common = dict(precondition_frequency=4, root_staleness=3, epsilon=1e-4)
    for combined in (False, True):
        model = mixed_model() if combined else DistributedDataParallel(mixed_model())
        with fronts["shampoo"](model.parameters(), partition_roots=not combined, **common) as opt:
            if combined:
                for x, y in batches:
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
            else:
                run(fronts["shampoo"], model, opt, batches)
        module = model if combined else model.module
        results[f"combined.{combined}"] = [p.detach().clone() for p in module.parameters()]
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 4])
def test_partitioned_root_work_is_bitwise_the_replicated_run(tmp_path: Path, world: int) -> None:
    """``partition_roots=True``: each root job solved by one rank, its roots broadcast at the
    install step. Every rank ends bitwise where the replicated run ends (Shampoo async, SOAP,
    NG+), each rank solving about 1/world of the roots; a checkpoint taken by rank 0 alone
    with roots in flight (it solves the other ranks' share itself) resumes bitwise; and
    partitioned DDP Shampoo equals one process on the combined batch to 1e-6 (ε = 1e-4)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path / "rank")
    mp.spawn(_partitioned, args=(world, str(tmp_path / "store"), out), nprocs=world, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    for name in ("shampoo", "soap", "ngplus"):
        replicated, solved_all, computed = ranks[0][f"{name}.False"]
        assert solved_all == computed > 0
        shares = []
        for r in ranks:
            params, solved, computed_here = r[f"{name}.True"]
            assert computed_here == computed  # every rank installs every root
            for a, b in zip(params, replicated):
                assert torch.equal(a, b), (name, (a - b).abs().max())
            for a, b in zip(r[f"{name}.resumed"], replicated):
                assert torch.equal(a, b), (name, "resumed", (a - b).abs().max())
            shares.append(solved)
        assert sum(shares) == computed and max(shares) < computed, (name, shares)
    for a, b in zip(ranks[0]["combined.False"], ranks[0]["combined.True"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # DDP's mean gradient = combined


def test_partition_roots_is_a_bool_and_a_no_op_in_one_process() -> None:
    from torch_shampoo import SOAP, NGPlus

    for front in (Shampoo, SOAP, NGPlus):
        with pytest.raises(TypeError, match="Invalid partition_roots: 1"):
            front([torch.nn.Parameter(torch.zeros(2, 2))], partition_roots=1)
    runs = []
    for partition in (False, True):
        model = mixed_model()
        kwargs = dict(lr=0.01, block_size=16, root_staleness=3, partition_roots=partition, **PIN)
        with Shampoo(model.parameters(), **kwargs) as opt:
            for x, y in make_batches(25):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            assert opt.root_stats()["roots_solved_here"] == opt.root_stats()["roots_computed"] > 0
        runs.append([p.detach() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------- DCP across world sizes


def _dcp_phase(rank: int, world: int, store: str, folder: str, phase: str) -> None:
    """``save``: 2 processes train 9 steps (the roots of step 8 due at 11: in flight), save
    with DCP, train on to 12 and write the uninterrupted result; ``load``: ``world`` processes
    load into a fresh optimizer (DCP builds its own template) and train steps 10-12."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    batches = make_batches(12)
    model = DistributedDataParallel(mixed_model() if phase == "save" else mixed_model(seed=1))
    kwargs = dict(lr=0.01, block_size=16, precondition_frequency=4, root_staleness=3, **PIN)
    opt = Shampoo(model.parameters(), epsilon=1e-4, partition_roots=True, **kwargs)

    def run(part):  # type: ignore[no-untyped-def]
        for x, y in part:
            share = x.shape[0] // world
            lo = rank * share
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[lo : lo + share]), y[lo : lo + share]).backward()
            opt.step()

    if phase == "save":
        run(batches[:9])
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
        }
        dcp.save(state, checkpoint_id=f"{folder}/ckpt")
        run(batches[9:])
    else:
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
        }
        dcp.load(state, checkpoint_id=f"{folder}/ckpt")
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        assert opt.root_stats()["pending_parameters"] > 0  # the saved roots in flight
        run(batches[9:])
    opt.close()
    if rank == 0:
        torch.save([p.detach() for p in model.module.parameters()], f"{folder}/{phase}.{world}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_dcp_checkpoint_saved_on_2_processes_resumes_on_4_and_on_1(tmp_path: Path) -> None:
    """Roots in flight included (the optimizer's state is replicated under DDP, so any world
    size can load it; owners are assigned again for the new world). The continuation equals the
    uninterrupted 2-process run to 1e-6 at ε = 1e-4: not bitwise, since the mean gradient of 4
    (or 1) shares rounds differently from that of 2."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    folder = str(tmp_path)
    for world, phase in ((2, "save"), (4, "load"), (1, "load")):
        store = str(tmp_path / f"store.{phase}.{world}")
        mp.spawn(_dcp_phase, args=(world, store, folder, phase), nprocs=world, join=True)
    uninterrupted = torch.load(f"{folder}/save.2", weights_only=True)
    for world in (4, 1):
        resumed = torch.load(f"{folder}/load.{world}", weights_only=True)
        for a, b in zip(resumed, uninterrupted):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

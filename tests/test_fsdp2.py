"""FSDP2 (``fully_shard``: DTensor parameters sharded on dim 0) on CPU with gloo, spawned.

The engine steps a sharded parameter as one process steps the whole tensor
(:mod:`torch_shampoo.distributed.dtensor`), so the claims are single-process ones: the update
equals one process's on the combined batch, whatever the shard boundaries. The model's ``mix`` (3
rows), ``out`` (3 rows) and ``out.bias`` do not split evenly over 2 ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from models import DISTRIBUTED_KWARGS, make_batches, mixed_model, train_share
from torch import nn

from torch_shampoo import SOAP, NGPlus, Shampoo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 12
KWARGS = DISTRIBUTED_KWARGS
FRONTS = {"shampoo": Shampoo, "ngplus": NGPlus, "soap": SOAP}


def _model() -> nn.Module:
    model = mixed_model()
    model.gain = nn.Parameter(torch.ones(1))  # fully_shard refuses 0-d parameters
    return model


def _whole(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(p, "full_tensor", p.detach)().detach() for p in model.parameters()]


def _init(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _sharded_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model.fc)
    fully_shard(model)
    return model


def _scenarios(rank: int, store: str, out: str) -> None:
    """Each front end under FSDP2; Shampoo with partitioned roots and state; the refusals;
    a DCP checkpoint saved and loaded on 2 processes; SOAP under DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, 2, store)
    batches = make_batches(STEPS)
    results: dict[str, Any] = {}
    for name, front in FRONTS.items():
        model = _sharded_model()
        with front(model.parameters(), **KWARGS[name]) as opt:
            train_share(model, opt, batches, rank, 2)
            results[f"{name} local rows"] = [p.to_local().shape[0] for p in model.parameters()]
        results[name] = _whole(model)
    model = _sharded_model()
    with Shampoo(model.parameters(), partition_roots=True, **KWARGS["shampoo"]) as opt:
        train_share(model, opt, batches, rank, 2)
        results["shampoo partitioned solved here"] = opt.root_stats()["roots_solved_here"]
    results["shampoo partitioned"] = _whole(model)
    model = _sharded_model()
    compact = dict(partition_roots=True, compact_state=True)
    with Shampoo(model.parameters(), **compact, **KWARGS["shampoo"]) as opt:
        train_share(model, opt, batches, rank, 2)
    results["shampoo compact partitioned"] = _whole(model)
    for partitioned in (False, True):
        model = _sharded_model()
        with Shampoo(model.parameters(), partition_state=partitioned, **KWARGS["shampoo"]) as opt:
            train_share(model, opt, batches, rank, 2)
            results[f"state bytes {partitioned}"] = opt.root_stats()["state_bytes"]
        results[f"shampoo state {partitioned}"] = _whole(model)
    results["refusals"] = _refusals()
    folder = str(Path(out).parent)
    results["dcp"] = {flatten: _dcp(rank, 2, folder, "save", flatten) for flatten in (True, False)}
    dist.barrier()
    results["dcp on 2"] = {
        flatten: _dcp(rank, 2, folder, "load", flatten) for flatten in (True, False)
    }
    plain = _model()
    ddp = DistributedDataParallel(plain)
    with SOAP(ddp.parameters(), **KWARGS["soap"]) as opt:
        train_share(ddp, opt, batches, rank, 2)
    results["soap ddp"] = _whole(plain)
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's atexit teardown sometimes aborts spawned processes


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    folder = tmp_path_factory.mktemp("fsdp2")
    out = str(folder / "rank")
    mp.spawn(_scenarios, args=(str(folder / "store"), out), nprocs=2, join=True)
    runs = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    runs[0]["folder"] = str(folder)
    return runs


def _one_process(name: str) -> list[torch.Tensor]:
    model = _model()
    with FRONTS[name](model.parameters(), **KWARGS[name]) as opt:
        train_share(model, opt, make_batches(STEPS), 0, 1)
    return _whole(model)


# How far the 12 steps may part from one process's: the mean of two half-batch gradients
# differs from the whole batch's gradient by about one float32 rounding per entry (which bits,
# depends on the CPU's kernels). Measured in one process: one rounding (±2^-24 relative) on
# every gradient entry, in random patterns (40 with torch's AVX-512 kernels, 10 each with its
# AVX2 and default ones and MKL's matching paths), moves the parameters by at most 2.2e-7 for
# Shampoo (ε = 1e-4) and 4.2e-7 for NG+ (the FSDP2 runs here: 1.7e-7 and 3.3e-7). A sharding
# error moves a parameter by a step, ~lr = 1e-2.
ONE_PROCESS_ATOL = {"shampoo": 1e-6, "ngplus": 2e-6}


@pytest.mark.parametrize("name", ["shampoo", "ngplus"])
def test_fsdp2_equals_one_process_on_the_combined_batch(
    fsdp2_runs: list[dict[str, Any]], name: str
) -> None:
    """Uneven shards included (3 rows over 2 ranks: 2 + 1); the ranks are bitwise identical."""
    assert fsdp2_runs[0][f"{name} local rows"][0] == 2  # mix: 3 rows, split 2 + 1
    assert fsdp2_runs[1][f"{name} local rows"][0] == 1
    reference = _one_process(name)
    assert not torch.equal(reference[0], _model().mix.detach())  # it trained
    for a, b, ref in zip(fsdp2_runs[0][name], fsdp2_runs[1][name], reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=0, atol=ONE_PROCESS_ATOL[name])


def test_fsdp2_soap_is_bitwise_soap_under_ddp(fsdp2_runs: list[dict[str, Any]]) -> None:
    """SOAP's bases of nearly degenerate factors turn rounding differences of the mean gradient
    into O(lr) ones, so against one process it is compared through DDP: at 2 ranks both
    average the same two gradients, and the sharded step must then equal the replicated one."""
    for rank in fsdp2_runs:
        for a, b in zip(rank["soap"], rank["soap ddp"]):
            assert torch.equal(a, b)
    for a, b in zip(fsdp2_runs[0]["soap"], fsdp2_runs[1]["soap"]):
        assert torch.equal(a, b)


def test_fsdp2_with_partitioned_roots_is_bitwise_the_replicated_run(
    fsdp2_runs: list[dict[str, Any]],
) -> None:
    solved = [rank["shampoo partitioned solved here"] for rank in fsdp2_runs]
    assert all(s > 0 for s in solved), solved  # each rank solved a share
    for rank in fsdp2_runs:
        for a, b in zip(rank["shampoo partitioned"], rank["shampoo"]):
            assert torch.equal(a, b)


def test_fsdp2_with_compact_state_and_partitioned_roots_equals_one_process(
    fsdp2_runs: list[dict[str, Any]],
) -> None:
    """Compact state under FSDP2, each root solved on one rank and broadcast as a full matrix,
    then installed as its triangle: one process's compact run on the combined batch."""
    model = _model()
    with Shampoo(model.parameters(), compact_state=True, **KWARGS["shampoo"]) as opt:
        train_share(model, opt, make_batches(STEPS), 0, 1)
    reference = _whole(model)
    runs = [rank["shampoo compact partitioned"] for rank in fsdp2_runs]
    for a, b, ref in zip(*runs, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=0, atol=ONE_PROCESS_ATOL["shampoo"])


def _refusals() -> list[str]:
    """A parameter sharded on dim 1 (tensor parallelism's colwise) for every front end, and
    per-sample NG+ on a sharded one: the errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    param = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))
    errors = []
    for front in (Shampoo, NGPlus, SOAP):
        try:
            front([param]).close()
            errors.append("accepted")
        except NotImplementedError as exc:
            errors.append(str(exc))
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight = nn.Parameter(distribute_tensor(torch.randn(3, 4), mesh, [Shard(0)]))
    try:
        NGPlus(model.parameters(), statistics="per_sample", model=model).close()
        errors.append("accepted")
    except NotImplementedError as exc:
        errors.append(str(exc))
    return errors


def test_other_placements_and_per_sample_ngplus_are_refused_by_name(
    fsdp2_runs: list[dict[str, Any]],
) -> None:
    errors = fsdp2_runs[0]["refusals"]
    assert len(errors) == 4
    for error, name in zip(errors, ("Shampoo", "NGPlus", "SOAP")):
        assert error.startswith(f"{name}: DTensor parameters sharded on dim 0"), error
        assert "(6, 4)" in error and "Shard(dim=1)" in error, error
    assert errors[3].startswith("NGPlus(statistics='per_sample') does not support DTensor")


def test_fsdp2_with_partitioned_state_is_bitwise_and_holds_a_share(
    fsdp2_runs: list[dict[str, Any]],
) -> None:
    """Each parameter kept and stepped by one rank, its whole broadcast, each rank writing its
    rows: the run is bitwise the replicated one, and each rank holds part of the state."""
    whole = fsdp2_runs[0]["state bytes False"]
    shares = [rank["state bytes True"] for rank in fsdp2_runs]
    assert all(0 < share < whole for share in shares), (shares, whole)
    assert sum(shares) >= 0.99 * whole
    for rank in fsdp2_runs:
        for a, b in zip(rank["shampoo state True"], rank["shampoo state False"]):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- DCP


def _dcp(rank: int, world: int, folder: str, phase: str, flatten: bool) -> list[torch.Tensor]:
    """``save``: FSDP2 on 2 processes, 9 steps (the roots of step 8 due at 11: in flight),
    saved with DCP, then on to step 12 (the uninterrupted run); ``load``: a fresh model (FSDP2
    on 2 processes, a plain one on 1) and an optimizer that has not stepped load it and train
    steps 10-12. Returns the whole parameters at the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    batches = make_batches(STEPS)
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model = _sharded_model() if world > 1 else _model()
    if phase == "load":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # a different start: the load must overwrite it
    opt = Shampoo(model.parameters(), **KWARGS["shampoo"])
    checkpoint = f"{folder}/ckpt.{flatten}"
    if phase == "save":
        train_share(model, opt, batches[:9], rank, world)
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt, options=options),
        }
        dcp.save(state, checkpoint_id=checkpoint)
    else:  # the template (DCP makes it with a zero-lr step when the state is empty)
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt, options=options),
        }
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"], options=options)
        assert opt.root_stats()["pending_parameters"] > 0  # the saved roots in flight
    train_share(model, opt, batches[9:], rank, world)
    opt.close()
    return _whole(model)


def _load_on(rank: int, world: int, store: str, folder: str) -> None:
    import torch.distributed as dist

    _init(rank, world, store)
    results = {flatten: _dcp(rank, world, folder, "load", flatten) for flatten in (True, False)}
    if rank == 0:
        torch.save(results, f"{folder}/load.{world}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_a_dcp_checkpoint_of_fsdp2_resumes_on_2_bitwise_and_on_1(
    fsdp2_runs: list[dict[str, Any]],
) -> None:
    """Roots in flight, flattened and nested. On 2 FSDP2 processes the continuation is bitwise
    the uninterrupted run's; in 1 plain process it equals it to 1e-6 at ε = 1e-4 (the mean
    gradient rounds differently). (On 4 FSDP2 processes, where a 3-row layer leaves one shard
    empty, it passed too; left out for the suite's time: the rows are tested below.)"""
    import torch.multiprocessing as mp

    folder = fsdp2_runs[0]["folder"]
    for world in (1,):
        store = f"{folder}/store.load.{world}"
        mp.spawn(_load_on, args=(world, store, folder), nprocs=world, join=True)
    for flatten in (True, False):
        for rank in fsdp2_runs:
            for a, b in zip(rank["dcp on 2"][flatten], rank["dcp"][flatten]):
                assert torch.equal(a, b)
        for world in (1,):
            resumed = torch.load(f"{folder}/load.{world}", weights_only=True)[flatten]
            for a, b in zip(resumed, fsdp2_runs[0]["dcp"][flatten]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_each_rank_writes_back_the_rows_torch_chunk_gives_it() -> None:
    """DTensor's ``Shard(0)`` splits like ``torch.chunk`` (trailing shards may be empty); the
    write-back's rows are checked against it for every size up to 9 rows and 5 ranks, on a
    one-dim mesh and on the second dim of an HSDP-like (Replicate, Shard(0)) mesh."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Replicate, Shard

    from torch_shampoo.distributed.dtensor import _local_rows

    for rows in range(10):
        for parts in range(1, 6):
            chunks = torch.arange(rows).chunk(parts) if rows else ()
            for index in range(parts):
                expected = chunks[index].tolist() if index < len(chunks) else []
                for placements, coordinate in (([Shard(0)], [index]),
                                               ([Replicate(), Shard(0)], [1, index])):  # fmt: skip
                    last = len(placements) - 1  # the sharded mesh dim
                    mesh = SimpleNamespace(
                        size=lambda d, last=last, parts=parts: parts if d == last else 2,
                        get_local_rank=lambda d, c=coordinate: c[d],
                    )
                    fake = SimpleNamespace(shape=(rows, 3), placements=placements, device_mesh=mesh)
                    got = list(range(rows))[_local_rows(fake)]
                    assert got == expected, (rows, parts, index, placements)

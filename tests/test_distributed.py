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


def _ddp_shampoo(rank: int, store: str, out: str, front: str) -> None:
    """Async Shampoo (or SOAP) with the defaults (``"auto"`` staleness) on a DDP model, each
    rank on its half of every batch; saves the parameters and the fitted staleness to
    ``out``.rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from torch_shampoo import SOAP

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = DistributedDataParallel(mixed_model())
    make = Shampoo if front == "shampoo" else SOAP
    with make(model.parameters(), lr=0.01, block_size=16, precondition_frequency=FREQUENCY) as opt:
        for x, y in make_batches(20):
            half = x.shape[0] // 2
            lo = rank * half
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[lo : lo + half]), y[lo : lo + half]).backward()
            opt.step()
        fitted = opt.param_groups[0].get("fitted_staleness")
    params = [p.detach() for p in model.module.parameters()]
    torch.save({"params": params, "fitted": fitted}, f"{out}.{rank}")
    dist.destroy_process_group()
    os._exit(0)  # gloo's atexit teardown sometimes aborts spawned processes


@pytest.mark.parametrize("front", ["shampoo", "soap"])
def test_under_ddp_auto_staleness_is_the_same_on_every_rank(tmp_path: Path, front: str) -> None:
    """Each process would fit "auto" from its own timings (without this rule two ranks fitted
    6 and 4, then 3 and 4, and drifted apart); with several processes every rank takes the
    frequency, so all install their roots at the same steps and stay bitwise identical."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path / "rank")
    mp.spawn(_ddp_shampoo, args=(str(tmp_path / "store"), out, front), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert [r["fitted"] for r in ranks] == [FREQUENCY, FREQUENCY]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert not torch.equal(ranks[0]["params"][0], mixed_model().conv.weight.detach())


def _dtensor_params(rank: int, store: str, out: str) -> None:
    """Both front ends given a DTensor parameter in a 1-process group; writes their errors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from torch_shampoo import SOAP, NGPlus

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    param = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    errors = []
    for front in (Shampoo, NGPlus, SOAP):
        try:
            front([param]).close()
            errors.append("accepted")
        except NotImplementedError as exc:
            errors.append(str(exc))
    Path(out).write_text("\n".join(errors))
    dist.destroy_process_group()
    os._exit(0)


def test_dtensor_parameters_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    """FSDP2 (fully_shard) hands the optimizer DTensors, which the engine cannot step yet (it
    failed deep inside the first step); both front ends refuse them at construction, naming
    the parameter's shape and placements."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "errors"
    mp.spawn(_dtensor_params, args=(str(tmp_path / "store"), str(out)), nprocs=1, join=True)
    errors = out.read_text().splitlines()
    assert len(errors) == 3
    for error, name in zip(errors, ("Shampoo", "NGPlus", "SOAP")):
        assert error.startswith(f"{name} does not support DTensor"), error
        assert "(6, 4)" in error and "Shard(dim=0)" in error, error

"""Defects of the multi-process paths (issue 29), each pinned by a test that failed before its
fix: gloo, two spawned processes, under a timeout (a hang fails the test instead of the run).

* ``partition_state=True`` when the ranks disagree on which parameters have a gradient: the
  broadcasts from the owners would wait for each other for good; every rank raises instead,
  naming the parameter, before any weight or state changes.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_shampoo import Shampoo

TIMEOUT = 120.0


def _spawn(target: object, args: tuple[object, ...], folder: Path) -> None:
    """Run ``target(rank, *args)`` in two processes; fail if they are not done in time."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    context = mp.spawn(target, args=args, nprocs=2, join=False)  # type: ignore[arg-type]
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the processes did not finish within {TIMEOUT:.0f} s (a hang)")


def _missing_gradient(rank: int, store: str, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=30),  # (before the fix: a hang until this, or the test's)
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    opt = Shampoo(model.parameters(), lr=0.01, partition_state=True)
    message = "no error"
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # a step every rank agrees on
    weights = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
             for i, p in enumerate(model.parameters()) if p in opt.state}  # fmt: skip
    try:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if rank == 1:
            model[1].bias.grad = None  # parameter 3 has no gradient here
        opt.step()
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
    after = {i: opt.state[p] for i, p in enumerate(model.parameters()) if p in opt.state}
    untouched = all(torch.equal(a, b) for a, b in zip(weights, model.parameters())) and all(
        torch.equal(after[i][k], v) for i, entry in state.items() for k, v in entry.items()
    )
    opt.close()
    Path(folder, f"rank.{rank}").write_text(f"untouched={untouched} {message}")
    os._exit(0)  # gloo's atexit teardown sometimes aborts spawned processes


def test_partition_state_with_a_gradient_missing_on_one_rank_raises_on_every_rank(
    tmp_path: Path,
) -> None:
    _spawn(_missing_gradient, (str(tmp_path / "store"), str(tmp_path)), tmp_path)
    for rank in range(2):
        message = (tmp_path / f"rank.{rank}").read_text()
        # raised before the owners stepped: weights and state as before the step, on every rank
        assert message.startswith("untouched=True RuntimeError"), f"rank {rank}: {message}"
        assert "parameter 3 (shape (4,)) on ranks [0] but not on [1]" in message, message

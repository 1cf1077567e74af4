"""Defects of the root pipeline (issue 29), each pinned by a test that failed before its fix.

* The modules below the scheduler never import it, nor does ``buckets`` (which makes the
  slots the scheduler hands out): no import cycle, not even one under ``TYPE_CHECKING`` or
  inside a function.
* Under ``partition_roots``, a rank that does not own a job writes the owner's roots into the
  job's host result buffer only after the previous upload out of that buffer has finished (on
  CUDA a non-blocking copy), exactly as the owner's worker does, and under the ticket's lock.
* A root worker slow to start does not leave its intra-op thread count behind as the
  process-wide count (the one a thread started later begins with).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_import_graph import import_graph

import torch_shampoo.roots.pool as root_pool
from torch_shampoo.distributed.partition_roots import Partition
from torch_shampoo.roots.pool import RootJob
from torch_shampoo.roots.scheduler import RootScheduler


def _reach(module: str) -> set[str]:
    """Every package module ``module`` imports, directly or not (wherever the import is: top
    level, ``TYPE_CHECKING``, a function body)."""
    graph = import_graph()
    seen: set[str] = set()
    todo = [module]
    while todo:
        for other in graph[todo.pop()]:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def test_no_module_below_the_scheduler_imports_it() -> None:
    below = _reach("roots.scheduler") - {"roots.scheduler"}
    assert "distributed.partition_roots" in below and "roots.pool" in below
    reaching_back = sorted(m for m in below if "roots.scheduler" in _reach(m))
    assert reaching_back == [], f"{reaching_back} import the scheduler, which imports them"


def test_the_buckets_take_their_slots_from_below_the_scheduler() -> None:
    assert "roots.scheduler" not in _reach("layout.buckets")


# --------------------------------------------------- partition_roots: the non-owner's write


class _Upload:
    """A stand-in for the CUDA event of the previous upload out of a result buffer: records
    what the buffer held when a thread waited for it."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.seen: list[torch.Tensor] = []

    def synchronize(self) -> None:
        assert self.buffer is not None
        self.seen.append(self.buffer.clone())


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(seed))
    return g @ g.T / (2 * d) + torch.eye(d)


@pytest.fixture
def non_owner(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Rank 1 of 2 with one job owned by rank 0 (one batch: ``assign`` gives it rank 0),
    snapshotted at step 1 and due at step 2; the broadcasts are faked: rank 0's flags say
    every root is fine, and its roots are all 7."""
    upload = _Upload()
    factors = torch.stack([_spd(4, 0), _spd(4, 1)])
    slot: Any = SimpleNamespace(
        indices=[0, 1], factors=factors, roots=torch.zeros_like(factors), triangles=None
    )
    scheduler = RootScheduler(async_roots=True, workers=1)
    partition = Partition.__new__(Partition)  # (no process group: the broadcasts are faked)
    partition.rank, partition.size, partition.group = 1, 2, None
    scheduler.partition = partition

    def jobs(staging: list[Any]) -> list[RootJob]:
        staging[0].snapshot.copy_(factors)
        return [RootJob(staging[0].snapshot, staging[0].result, None, None, 1.0, 4.0,
                        1e-12, "eigh")]  # fmt: skip

    def broadcast(tensor: torch.Tensor, src: int, group: Any = None) -> None:
        assert src == 0
        tensor.fill_(1 if tensor.dtype == torch.uint8 else 7.0)

    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    p = torch.zeros(4, 4)
    assert not scheduler.submit(p, [slot], jobs, t=1, due=2)
    upload.buffer = torch.zeros_like(factors)  # a free host buffer, its upload still going on:
    scheduler.host.give(upload.buffer, upload)  # the job's result buffer, taken when it is sent
    scheduler.send()
    pending = scheduler.pending[p]
    assert pending.owners == [0] and not pending.tickets[0].done()  # rank 1 waits for it
    yield {"scheduler": scheduler, "p": p, "upload": upload, "pending": pending}
    scheduler.close()


def test_a_non_owner_waits_for_the_previous_upload_before_writing_the_roots(
    non_owner: dict[str, Any],
) -> None:
    scheduler, upload, pending = non_owner["scheduler"], non_owner["upload"], non_owner["pending"]
    result = pending.buffers[0].result
    assert result is upload.buffer and pending.jobs[0].result_free is upload
    result.fill_(3.0)  # the previous cycle's roots, being uploaded
    taken = scheduler.take_due(non_owner["p"], 2, {}, 2, False)
    assert taken is pending
    assert len(upload.seen) == 1, "the buffer was written without waiting for its upload"
    assert torch.equal(upload.seen[0], torch.full_like(result, 3.0))  # not yet written then
    assert torch.equal(result, torch.full_like(result, 7.0))  # the owner's roots, after
    assert [o.ok for o in pending.tickets[0].outcome()] == [True, True]


def test_a_non_owner_ends_its_ticket_under_the_tickets_lock(non_owner: dict[str, Any]) -> None:
    """While another thread holds the ticket's lock (a worker writing, a cancellation), the
    exchange neither writes the buffer nor ends the ticket."""
    scheduler, pending = non_owner["scheduler"], non_owner["pending"]
    ticket, result = pending.tickets[0], pending.buffers[0].result
    result.fill_(3.0)
    with ticket._lock:
        exchange = threading.Thread(
            target=scheduler.take_due, args=(non_owner["p"], 2, {}, 2, False)
        )
        exchange.start()
        exchange.join(0.3)
        assert not ticket.done(), "the ticket was ended without its lock"
        assert torch.equal(result, torch.full_like(result, 3.0))
    exchange.join(10)
    assert ticket.done() and torch.equal(result, torch.full_like(result, 7.0))


# ------------------------------------------------------ a worker slow to set its thread count


def test_a_worker_slow_to_start_leaves_no_thread_count_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool waits a while for its workers to set their counts, then puts the caller's
    count back; a worker that set its count only after that (it started late: here 0.3 s,
    past a wait of 0.05 s) left its count as the process-wide one. Now the last of them puts
    the caller's count back, whichever it is."""
    outer = torch.get_num_threads()
    torch.set_num_threads(2)  # the pool's workers use 1: a count that differs from it
    try:
        monkeypatch.setattr(root_pool, "_READY_SECONDS", 0.05)
        real_work, real_solve = root_pool._work, root_pool.solve
        counts: list[int] = []

        def late(*args: Any) -> None:
            time.sleep(0.3)
            real_work(*args)

        def solve(jobs: Any) -> Any:
            counts.append(torch.get_num_threads())
            return real_solve(jobs)

        monkeypatch.setattr(root_pool, "_work", late)
        monkeypatch.setattr(root_pool, "solve", solve)
        pool = root_pool.RootPool(1, 1)
        x = _spd(4, 2)[None]
        (ticket,) = pool.submit([RootJob(x, x.clone(), None, None, 1.0, 4.0, 1e-12, "eigh")])
        ticket.wait()
        time.sleep(0.1)
        later: list[int] = []
        fresh = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        fresh.start()
        fresh.join()
        pool.close()
        assert counts == [1]  # the worker computed at the pool's count
        assert torch.get_num_threads() == 2  # the caller's
        assert later == [2], "a worker's count was left as the one new threads begin with"
    finally:
        torch.set_num_threads(outer)

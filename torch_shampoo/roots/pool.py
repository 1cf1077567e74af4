"""Inverse roots off the training thread: :func:`batches`, :func:`solve` (the only code that
computes roots, always at the workers' thread count) and a pool of CPU worker threads, which
also solves the batches a step waits for together with the calling thread (:meth:`solve_now`)."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from .. import device
from .jobs import RootJob, RootOutcome, Ticket
from .matrix_roots import RootResult, eigenbases, finite_rows, inverse_roots

__all__ = ["RootJob", "RootPool", "Ticket", "batches", "run_here", "solve"]


def solve(jobs: Sequence[RootJob]) -> list[tuple[list[RootOutcome], torch.Tensor]]:
    """The roots X = (F/bc + εI)^(−1/r) (relative ε: ε·τ, τ = tr(F/bc)/d) of one batch of
    :func:`batches` in float64 (or float32 first: ``RootJob.root_dtype``); per job, one outcome
    per factor and its roots. A root depends on its batch (LAPACK's last bits), so whatever
    solves a job solves its whole batch."""
    for job in jobs:
        device.wait(job.snapshot_ready)
    with device.subnormals_flushed():  # as in the step, in whichever thread solves the batch
        return _solve(jobs)


def _solve(jobs: Sequence[RootJob]) -> list[tuple[list[RootOutcome], torch.Tensor]]:
    start = time.perf_counter()
    first = jobs[0]
    snapshot = first.snapshot if len(jobs) == 1 else torch.cat([j.snapshot for j in jobs])
    if first.eigenbasis:  # F's eigenvectors do not depend on its scale or on ε
        found = eigenbases(snapshot, first.root_dtype)
        roots = torch.stack([f.root for f in found]) if found else snapshot.double()
        outcomes = _outcomes(found, start)
    else:
        matrices = snapshot.to(torch.float64) / first.scale
        level = None
        if first.relative and len(matrices):
            # (F + ετI)^(−1/r) = τ^(−1/r) (F/τ + εI)^(−1/r): the batch solves normalized factors
            level = matrices.diagonal(dim1=-2, dim2=-1).mean(-1)
            level = torch.where(level > 0, level, 1.0).nan_to_num_(1.0, 1.0, 1.0)[:, None, None]
            matrices = matrices / level
        found = inverse_roots(
            matrices, first.exponent, first.epsilon, first.method, dtype=first.root_dtype
        )
        roots = torch.stack([f.root for f in found]) if found else matrices
        if level is not None:
            roots = roots * level.pow(-1.0 / first.exponent)
        # finite in the result's dtype: a float64 root beyond float32's range installs as inf
        finite = finite_rows(roots.to(first.result.dtype)) if found else []
        outcomes = _outcomes(found, start, finite)
    rows = [0, *itertools.accumulate(job.snapshot.shape[0] for job in jobs)]
    return [(outcomes[a:b], roots[a:b]) for a, b in itertools.pairwise(rows)]


MERGED_WORK = 2**22
"""The most root work (rows × d³) one batch gathers (16 factors of 64 x 64): a job's fixed cost
(~0.3-0.7 ms) is not small below it; beyond it batches stay apart, for several workers."""


def batches(jobs: Sequence[RootJob]) -> list[list[int]]:
    """Which of ``jobs`` are solved together: equal settings, size and dtype, in order, within
    :data:`MERGED_WORK`; a pure function of shapes and settings (every mode and rank agrees)."""
    gathering: dict[tuple[object, ...], list[int]] = {}
    work: dict[tuple[object, ...], float] = {}
    out: list[list[int]] = []
    for i, job in enumerate(jobs):
        k, d = job.snapshot.shape[0], job.snapshot.shape[-1]
        key = (d, job.snapshot.dtype, job.scale, job.exponent, job.epsilon, job.method,
               job.relative, job.eigenbasis, job.root_dtype)  # fmt: skip
        if key not in gathering or work[key] + k * float(d) ** 3 > MERGED_WORK:
            gathering[key], work[key] = [], 0.0
            out.append(gathering[key])
        gathering[key].append(i)
        work[key] += k * float(d) ** 3
    return out


def _outcomes(
    found: list[RootResult], start: float, finite: list[bool] | None = None
) -> list[RootOutcome]:
    seconds = (time.perf_counter() - start) / max(1, len(found))
    oks = [f.ok and fine for f, fine in zip(found, finite or [True] * len(found))]
    return [
        RootOutcome(ok, f.error, f.reason or ("" if ok else "non-finite root"), seconds, f.retried)
        for f, ok in zip(found, oks)
    ]


def run_here(
    jobs: Sequence[RootJob], threads: int, tickets: Sequence[Ticket] | None = None
) -> list[Ticket]:
    """Solve the batch ``jobs`` on this thread at ``threads`` intra-op threads, as a worker would
    (the same bits); returns their ended tickets (or ends the given ones, as ``submit`` does)."""
    ended = list(tickets) if tickets is not None else [Ticket() for _ in jobs]
    with _thread_count(threads):
        _run(ended, list(jobs))
    return ended


@contextlib.contextmanager
def _thread_count(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


class _Claim:
    """A batch of :meth:`RootPool.solve_now`, queued for every solver: the first to take it
    solves it, the others skip it."""

    def __init__(self) -> None:
        self._lock, self._taken = threading.Lock(), False

    def take(self) -> bool:
        with self._lock:
            taken, self._taken = self._taken, True
        return not taken


def _run(
    tickets: list[Ticket], jobs: list[RootJob], claim: _Claim | None = None, here: bool = False
) -> None:
    """Solve a batch and end each of its tickets (what the batch raised fails every one; on the
    calling thread, ``here``, an interrupt, not an ``Exception``, is raised again after)."""
    if claim is not None and not claim.take():  # another solver has it
        return
    if all(ticket.done() for ticket in tickets):  # cancelled while queued
        return
    try:
        solved = solve(jobs)
        for ticket, job, (outcomes, roots) in zip(tickets, jobs, solved):
            ticket.write(job, outcomes, roots)
    except BaseException as exc:  # handed to the main thread by outcome()
        for ticket in tickets:
            ticket.fail(exc)
        if here and not isinstance(exc, Exception):
            raise


class _Call:
    """A task of :meth:`RootPool.run_now` for every solver: the first to take it runs it."""

    def __init__(self, task: Callable[[], None]) -> None:
        self.task, self.claim, self.done = task, _Claim(), threading.Event()
        self.error: BaseException | None = None

    def run(self, here: bool = False) -> None:
        if not self.claim.take():
            return
        try:
            with device.subnormals_flushed():  # (as in the step)
                self.task()
        except BaseException as exc:  # raised again by run_now (on its thread, an interrupt now)
            self.error = exc
            if here and not isinstance(exc, Exception):
                raise
        finally:
            self.done.set()


def _work_of(jobs: Sequence[RootJob]) -> float:
    return sum(job.snapshot.shape[0] * float(job.snapshot.shape[-1]) ** 3 for job in jobs)


_Work = tuple[list[Ticket], list[RootJob], _Claim | None] | _Call | None
_READY_SECONDS = 5.0
_THREAD_NAME = "torch_shampoo-root-"
_LIVE_POOLS: weakref.WeakSet[RootPool] = weakref.WeakSet()
_WORKERS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
"""Every worker thread this module started (a running thread is referenced by ``threading``)."""


class RootPool:
    """Daemon worker threads at ``threads`` intra-op threads each, solving batches from a queue;
    started by the first :meth:`submit` or :meth:`solve_now` in a process. ``helpers``: more
    threads that only join :meth:`solve_now`. :meth:`close` never waits for a root."""

    def __init__(self, num_workers: int, threads: int, helpers: int = 0) -> None:
        self.num_workers, self.threads = num_workers, threads
        self.helpers = helpers
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._now: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        """What only :meth:`solve_now` queues (for the helpers)."""
        self._threads: list[threading.Thread] = []
        self._outstanding: weakref.WeakSet[Ticket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._finalizer: weakref.finalize | None = None
        _LIVE_POOLS.add(self)

    def _start(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's threads and queue are not ours
            self._fresh()
            self._pid = os.getpid()
        if self._threads:
            return
        total = self.num_workers + self.helpers
        borrowed = _BorrowedCount(total, torch.get_num_threads())
        for i in range(total):
            thread = threading.Thread(
                target=_work,
                args=(self._queue if i < self.num_workers else self._now, self.threads, borrowed),
                name=f"{_THREAD_NAME}{i}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
            _WORKERS.add(thread)
        borrowed.stop_waiting()
        self._finalizer = weakref.finalize(self, _stop, [self._queue] * self.num_workers + [
            self._now] * self.helpers, self._outstanding, self._lock)  # fmt: skip

    def _fresh(self) -> None:
        self._queue, self._now, self._threads = queue.SimpleQueue(), queue.SimpleQueue(), []
        self._outstanding, self._lock = weakref.WeakSet(), threading.Lock()

    def submit(
        self, jobs: Sequence[RootJob], tickets: Sequence[Ticket] | None = None
    ) -> list[Ticket]:
        """Queue the batch ``jobs`` (solved together by one worker); returns a ticket per job
        (or uses the given ones: one that has already ended is not written)."""
        self._start()
        queued = list(tickets) if tickets is not None else [Ticket() for _ in jobs]
        with self._lock:
            for ticket in queued:
                self._outstanding.add(ticket)
        self._queue.put((queued, list(jobs), None))
        return queued

    def solve_now(self, batches: Sequence[Sequence[RootJob]]) -> list[list[Ticket]]:
        """Solve the batches ``batches`` now, on this thread and every worker and helper at once,
        each batch whole by one of them at :attr:`threads` (the same bits as :meth:`submit`), the
        largest first; returns their tickets, ended. An interrupt while this thread solves or
        waits cancels the batches not yet solved (none is written later) and is raised."""
        tickets = [[Ticket() for _ in jobs] for jobs in batches]
        order = sorted(range(len(batches)), key=lambda i: -_work_of(batches[i]))
        claims = [_Claim() for _ in batches]
        try:
            if len(batches) > 1:  # (one alone: this thread, whose count may need no change)
                self._start()
                with self._lock:
                    self._outstanding.update(t for i in order for t in tickets[i])
                queues = [self._queue] + [self._now] * bool(self.helpers)
                for i in order[1:]:  # (this thread takes the first at once)
                    for target in queues:
                        target.put((tickets[i], list(batches[i]), claims[i]))
            with _thread_count(self.threads):
                for i in order:
                    _run(tickets[i], list(batches[i]), claims[i], here=True)
            for ticket in (t for group in tickets for t in group):
                ticket.wait()
        except BaseException:
            for ticket in (t for group in tickets for t in group):
                ticket.cancel("the step that waited for this root was interrupted")
            raise
        return tickets

    def run_now(self, tasks: Sequence[Callable[[], None]], weights: Sequence[float]) -> None:
        """Run ``tasks`` (touching disjoint state) on this thread and every worker and helper at
        once, each at :attr:`threads` threads (the same bits whoever runs it), the heaviest
        (``weights``) first; then raise the first error (an interrupt: no task starts after)."""
        calls = [_Call(tasks[i]) for i in sorted(range(len(tasks)), key=lambda i: -weights[i])]
        if len(calls) > 1:  # (one alone: this thread, whose count may need no change)
            self._start()
            for call in calls[1:]:
                for target in [self._queue] + [self._now] * bool(self.helpers):
                    target.put(call)
        try:
            with _thread_count(self.threads):
                for call in calls:
                    call.run(here=True)
        except BaseException:
            for call in calls:
                if call.claim.take():  # (none starts now)
                    call.done.set()
            raise
        finally:
            for call in calls:
                call.done.wait()
        for failed in (c.error for c in calls if c.error is not None):
            raise failed

    def close(self) -> None:
        """Cancel the jobs not yet solved and let the workers exit; returns at once."""
        if self._finalizer is not None and self._pid == os.getpid():
            self._finalizer()
        # The old workers exit through the old queues; a later submit starts fresh ones.
        self._fresh()


class _BorrowedCount:
    """A worker's ``set_num_threads`` also writes torch's process-wide count: the caller's is put
    back once every worker has set its own, by the pool (which waits :data:`_READY_SECONDS` at
    most) or else by the last worker, on a thread of its own (not to change its own count)."""

    def __init__(self, workers: int, caller: int) -> None:
        self.left, self.caller, self.waiting = workers, caller, True
        self.lock, self.all_set = threading.Lock(), threading.Event()

    def stop_waiting(self) -> None:
        """On the pool's caller, after starting the workers."""
        self.all_set.wait(_READY_SECONDS)
        with self.lock:
            self.waiting = False
            last = self.left == 0
        if last:
            torch.set_num_threads(self.caller)

    def worker_set(self) -> None:
        """On a worker, once its count is set (or failed to be)."""
        with self.lock:
            self.left -= 1
            last, late = self.left == 0, not self.waiting
        if last:
            self.all_set.set()
        if last and late:
            restore = threading.Thread(
                target=torch.set_num_threads, args=(self.caller,), name="torch_shampoo-count"
            )
            try:
                restore.start()
            except RuntimeError:  # the interpreter is exiting: no thread starts after it
                return
            restore.join()


def _work(jobs: queue.SimpleQueue[_Work], threads: int, borrowed: _BorrowedCount) -> None:
    # torch gives a thread its count lazily from the process-wide count, which another thread
    # may set meanwhile (other roots' bits): init first, then set.
    try:
        torch.get_num_threads()
        torch.set_num_threads(threads)
    finally:
        borrowed.worker_set()
    while (item := jobs.get()) is not None:
        if isinstance(item, _Call):
            item.run()
        else:
            _run(*item)


def _stop(
    queues: list[queue.SimpleQueue[_Work]],
    outstanding: weakref.WeakSet[Ticket],
    lock: threading.Lock,
) -> None:
    """(``queues``: one per worker.)"""
    with lock:
        tickets = list(outstanding)
    for ticket in tickets:
        ticket.cancel("the root pool was closed before this root was computed")
    for jobs in queues:  # drop what is queued; each worker then exits after its current job
        while True:
            try:
                jobs.get_nowait()
            except queue.Empty:
                break
    for jobs in queues:
        jobs.put(None)


@atexit.register
def _close_all() -> None:
    """Cancel the queued roots and wait for the one each worker may be in the middle of: a
    thread inside torch's C++ code while the interpreter tears torch down aborts the process."""
    for pool in list(_LIVE_POOLS):
        pool.close()
    for thread in list(_WORKERS):  # (not a thread of another copy of this module: it waits
        if thread is not threading.current_thread():  # for its own module's exit hook)
            thread.join()

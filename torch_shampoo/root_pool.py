"""Inverse roots off the training thread: jobs, tickets and a pool of CPU worker threads.

A :class:`RootJob` is everything one inverse root needs: a host snapshot of the factor F taken
at the root step, the bias-correction divisor, the exponent and the epsilon. :func:`solve` turns
it into X = (F/bc + εI)^(−1/r) written into the job's host result buffer; it is the *only* code
that computes roots, whether it runs inline (synchronous roots) or on a worker thread, so the two
modes produce bitwise-identical roots from the same snapshot.

:class:`RootPool` runs jobs on daemon threads fed by a queue; :class:`InlineRunner` runs them at
submission. Both return a :class:`Ticket` the optimizer waits on when the root is due.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from . import device
from .matrix_roots import inverse_root

__all__ = ["InlineRunner", "RootJob", "RootOutcome", "RootPool", "Ticket", "solve"]


@dataclass
class RootJob:
    """One inverse root to compute from a host snapshot of a factor."""

    snapshot: torch.Tensor
    """Host copy of F (pinned on CUDA); read only after ``snapshot_ready``."""
    result: torch.Tensor
    """Host buffer the root is written into (pinned on CUDA), in the factor's dtype."""
    snapshot_ready: device.CopyDone
    result_free: device.CopyDone
    """The previous upload out of ``result``; it must finish before ``result`` is overwritten."""
    scale: float
    exponent: float
    epsilon: float
    method: str


@dataclass(frozen=True)
class RootOutcome:
    """What a job produced: ``ok`` tells whether ``job.result`` holds a usable root."""

    ok: bool
    error: float
    reason: str
    seconds: float


def solve(job: RootJob) -> RootOutcome:
    """Compute the job's root in float64 and store it in ``job.result``."""
    device.wait(job.snapshot_ready)
    start = time.perf_counter()
    matrix = job.snapshot.to(torch.float64) / job.scale
    found = inverse_root(matrix, job.exponent, job.epsilon, job.method)
    ok = found.ok and bool(torch.isfinite(found.root).all())
    if ok:
        device.wait(job.result_free)
        job.result.copy_(found.root)
    reason = found.reason or ("non-finite root" if not ok else "")
    return RootOutcome(ok, found.error, reason, time.perf_counter() - start)


class Ticket:
    """The promise of a :class:`RootOutcome`; :meth:`outcome` blocks until it is there."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._outcome: RootOutcome | None = None
        self._error: BaseException | None = None

    @classmethod
    def resolved(cls, outcome: RootOutcome) -> Ticket:
        """A ticket whose outcome is already known (restored from a state dict)."""
        ticket = cls()
        ticket._outcome = outcome
        ticket._done.set()
        return ticket

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def _run(self, job: RootJob) -> None:
        try:
            self._outcome = solve(job)
        except BaseException as exc:  # handed to the main thread by outcome()
            self._error = exc
        finally:
            self._done.set()

    def outcome(self) -> RootOutcome:
        """The job's outcome; re-raises (on the caller's thread) whatever the job raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


class InlineRunner:
    """Runs each job at submission, on the calling thread (synchronous roots)."""

    def submit(self, job: RootJob) -> Ticket:
        ticket = Ticket()
        ticket._run(job)
        return ticket

    def close(self) -> None:
        """Nothing to stop."""


_Work = tuple[Ticket, RootJob] | None
_LIVE_POOLS: weakref.WeakSet[RootPool] = weakref.WeakSet()


class RootPool:
    """Daemon worker threads that solve :class:`RootJob` s from a FIFO queue.

    Threads start on the first :meth:`submit` in the submitting process; a forked child that
    inherits a pool object starts its own threads and never touches the parent's. :meth:`close`
    is idempotent and is also called at interpreter exit and when the pool is collected.
    """

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"root_workers must be a positive integer, got {num_workers!r}")
        self.num_workers = num_workers
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pid = os.getpid()
        self._finalizer: weakref.finalize | None = None
        _LIVE_POOLS.add(self)

    def _start(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's threads and queue are not ours
            self._queue, self._threads, self._pid = queue.SimpleQueue(), [], os.getpid()
        if self._threads:
            return
        # Roots must not depend on which thread computes them: workers use the intra-op thread
        # count of the thread that starts them (LAPACK results can differ between counts).
        threads = torch.get_num_threads()
        for i in range(self.num_workers):
            thread = threading.Thread(
                target=_work,
                args=(self._queue, threads),
                name=f"torch_shampoo-root-{i}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        self._finalizer = weakref.finalize(self, _stop, self._queue, list(self._threads))

    def submit(self, job: RootJob) -> Ticket:
        self._start()
        ticket = Ticket()
        self._queue.put((ticket, job))
        return ticket

    def close(self) -> None:
        """Stop the workers after the jobs already queued; idempotent."""
        if self._finalizer is not None and self._pid == os.getpid():
            self._finalizer()
        self._threads = []


def _work(jobs: queue.SimpleQueue[_Work], threads: int) -> None:
    torch.set_num_threads(threads)
    while (item := jobs.get()) is not None:
        ticket, job = item
        ticket._run(job)


def _stop(jobs: queue.SimpleQueue[_Work], threads: list[threading.Thread]) -> None:
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(timeout=10.0)


@atexit.register
def _close_all() -> None:
    """At exit nobody will install the roots still queued: drop them, then stop the workers
    (each finishes at most the job it is running)."""
    for pool in list(_LIVE_POOLS):
        if pool._pid == os.getpid():
            _drop_queued(pool._queue)
        pool.close()


def _drop_queued(jobs: queue.SimpleQueue[_Work]) -> None:
    while True:
        try:
            item = jobs.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            item[0]._fail(RuntimeError("the root pool was stopped at interpreter exit"))

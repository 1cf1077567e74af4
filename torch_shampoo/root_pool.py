"""Inverse roots off the training thread: jobs, tickets and a pool of CPU worker threads.

A :class:`RootJob` is everything the inverse roots of a stack of equal-size factors need (a
parameter's factors of one bucket and dim): a host snapshot of the stack taken at the root step,
the bias-correction divisor, the exponent and the epsilon. Jobs with equal settings and size are
solved together (:func:`batches`: a model of many small parameters pays one job's fixed cost per
batch, not per parameter). :func:`solve` turns a batch into X = (F/bc + εI)^(−1/r) per factor
(one batched eigendecomposition), or with a relative epsilon X = (F/bc + ε·τ I)^(−1/r),
τ = tr(F/bc)/d its mean eigenvalue; it is the *only* code that computes roots, and it always
runs with the same number of intra-op threads (the pool's ``threads``) on the same batches, so
roots are bitwise the same whether they are waited for at once (synchronous roots) or
installed later.

:class:`RootPool` runs batches on daemon threads fed by a queue and returns a :class:`Ticket`
per job, which the optimizer waits on when the root is due. :meth:`RootPool.close` returns at
once: it cancels the tickets still outstanding, and a worker that finishes a cancelled job
discards its root instead of writing it, so no thread writes into a buffer after ``close()``.
:func:`run_here` solves a batch on the calling thread (synchronous roots; a state dict that
needs a cancelled root).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import device
from .matrix_roots import RootResult, eigenbases, finite_rows, inverse_roots

__all__ = [
    "RootCancelled",
    "RootJob",
    "RootOutcome",
    "RootPool",
    "Ticket",
    "batches",
    "default_threads",
    "run_here",
    "solve",
]


@dataclass
class RootJob:
    """The inverse roots of a (k, d, d) stack of factors, from a host snapshot."""

    snapshot: torch.Tensor
    """Host copy of the factors (pinned on CUDA); read only after ``snapshot_ready``."""
    result: torch.Tensor
    """Host buffer the roots are written into (pinned on CUDA), in the factors' dtype; a
    factor whose root fails keeps what its row held."""
    snapshot_ready: device.CopyDone
    result_free: device.CopyDone
    """The previous upload out of ``result``; it must finish before ``result`` is overwritten."""
    scale: float
    exponent: float
    epsilon: float
    method: str
    relative: bool = False
    """ε is relative to each factor's mean eigenvalue τ = tr(F)/d (τ ≤ 0: absolute)."""
    eigenbasis: bool = False
    """Compute each factor's eigenvectors Q instead of a root (eigenvalue-corrected Shampoo)."""


@dataclass(frozen=True)
class RootOutcome:
    """What a job produced for one factor: ``ok`` tells whether its row of ``job.result``
    holds a usable root."""

    ok: bool
    error: float
    reason: str
    seconds: float


class RootCancelled(RuntimeError):
    """The job's pool was closed (or the process forked) before the root was written."""


def solve(jobs: Sequence[RootJob]) -> list[tuple[list[RootOutcome], torch.Tensor]]:
    """Compute the roots of jobs solved together (one batch of :func:`batches`: equal
    settings, size and dtype) in float64, as one stack; returns per job one outcome per factor
    and its roots (rows whose outcome is not ok must not be used). The caller writes the usable
    rows into ``job.result`` (see :meth:`Ticket._write`). A root depends on the batch it is
    solved in (LAPACK's last bits follow a matrix's alignment in the stack), so every path
    that solves a job solves its whole batch."""
    for job in jobs:
        device.wait(job.snapshot_ready)
    with device.subnormals_flushed():  # as in the step, in whichever thread solves the batch
        return _solve(jobs)


def _solve(jobs: Sequence[RootJob]) -> list[tuple[list[RootOutcome], torch.Tensor]]:
    start = time.perf_counter()
    first = jobs[0]
    snapshot = first.snapshot if len(jobs) == 1 else torch.cat([j.snapshot for j in jobs])
    if first.eigenbasis:  # F's eigenvectors do not depend on its scale or on ε
        found = eigenbases(snapshot)
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
        found = inverse_roots(matrices, first.exponent, first.epsilon, first.method)
        roots = torch.stack([f.root for f in found]) if found else matrices
        if level is not None:
            roots = roots * level.pow(-1.0 / first.exponent)
        finite = finite_rows(roots) if found else []
        outcomes = _outcomes(found, start, finite)
    out, row = [], 0
    for job in jobs:
        k = job.snapshot.shape[0]
        out.append((outcomes[row : row + k], roots[row : row + k]))
        row += k
    return out


MERGED_WORK = 2**22
"""How much root work (rows × d³) one batch of small jobs gathers at most: 16 factors of
64 x 64, 2 of 128 x 128. Below it a job's fixed cost (a ticket, a hand-over, a dozen small
torch calls: ~0.3-0.7 ms) is not small against its eigendecompositions; beyond it batches stay
apart, so that several workers share the work."""


def batches(jobs: Sequence[RootJob]) -> list[list[int]]:
    """Which of ``jobs`` are solved together: those with equal settings, factor size and dtype,
    in order, gathered while their work stays within :data:`MERGED_WORK` (a job that alone
    exceeds it is a batch of its own). A pure function of the jobs' shapes and settings, so
    every mode, rank and retry forms the same batches (and so computes the same bits)."""
    gathering: dict[tuple[object, ...], list[int]] = {}
    work: dict[tuple[object, ...], float] = {}
    out: list[list[int]] = []
    for i, job in enumerate(jobs):
        k, d = job.snapshot.shape[0], job.snapshot.shape[-1]
        key = (d, job.snapshot.dtype, job.scale, job.exponent, job.epsilon, job.method,
               job.relative, job.eigenbasis)  # fmt: skip
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
    return [
        RootOutcome(
            f.ok and fine,
            f.error,
            f.reason or ("non-finite root" if not (f.ok and fine) else ""),
            seconds,
        )
        for f, fine in zip(found, finite or [True] * len(found))
    ]


class Ticket:
    """The promise of a :class:`RootOutcome`; :meth:`outcome` blocks until it is there.

    A ticket ends exactly once: solved (the root written into the job's result buffer),
    failed, or cancelled. The write of the root and the cancellation exclude each other, so
    once :meth:`cancel` has returned the job's buffer is never written by this ticket."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._outcome: list[RootOutcome] | None = None
        self._error: BaseException | None = None
        self.finished_at = 0.0
        """``time.perf_counter()`` when the ticket ended."""

    @classmethod
    def resolved(cls, outcomes: list[RootOutcome]) -> Ticket:
        """A ticket whose outcomes are already known (restored from a state dict)."""
        ticket = cls()
        ticket._outcome = outcomes
        ticket._done.set()
        return ticket

    @classmethod
    def cancelled_one(cls, why: str) -> Ticket:
        """A ticket that ended cancelled (its job must be computed again)."""
        ticket = cls()
        ticket._end(None, RootCancelled(why))
        return ticket

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self._error, RootCancelled)

    def wait(self) -> None:
        self._done.wait()

    def _end(self, outcome: list[RootOutcome] | None, error: BaseException | None) -> None:
        self._outcome, self._error = outcome, error
        self.finished_at = time.perf_counter()
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if not self.done():
                self._end(None, error)

    def cancel(self, why: str) -> None:
        """End the ticket as cancelled unless it has already ended; after this returns the
        job's result buffer is not written by this ticket."""
        self._fail(RootCancelled(why))

    def _write(self, job: RootJob, outcomes: list[RootOutcome], roots: torch.Tensor) -> None:
        """Write the usable rows of ``roots`` into ``job.result`` and end as solved, unless
        the ticket has already ended (cancelled: the roots are discarded)."""
        if self.done():
            return
        ok = [o.ok for o in outcomes]
        if any(ok):
            device.wait(job.result_free)
        with self._lock:
            if self.done():
                return  # cancelled meanwhile: discard the roots
            if all(ok):
                job.result.copy_(roots)
            else:
                for row in (i for i, fine in enumerate(ok) if fine):
                    job.result[row].copy_(roots[row])
            self._end(outcomes, None)

    def outcome(self) -> list[RootOutcome]:
        """The job's outcome per factor; re-raises (on the caller's thread) whatever the job
        raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


def default_threads(workers: int) -> int:
    """Intra-op threads per root worker: half of the caller's thread count shared among the
    workers (at least 1), the other half left to the training thread. A worker's own thread
    team on top of a training thread that already uses every core slows *every* step, not only
    while roots run: on 2 cores, one 2-thread worker made the non-root steps of the regression
    demo 4x slower (0.50 -> 1.99 ms median), a 1-thread worker left them as they were."""
    return max(1, torch.get_num_threads() // (2 * workers))


def run_here(
    jobs: Sequence[RootJob], threads: int, tickets: Sequence[Ticket] | None = None
) -> list[Ticket]:
    """Solve the batch ``jobs`` on the calling thread with ``threads`` intra-op threads (as a
    worker would, so the roots are bitwise the same) and return their ended tickets (or end
    the given ``tickets``: one that has already ended is left as it is, its job not written)."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        ended = list(tickets) if tickets is not None else [Ticket() for _ in jobs]
        _run(ended, list(jobs))
    finally:
        if before != threads:
            torch.set_num_threads(before)
    return ended


def _run(tickets: list[Ticket], jobs: list[RootJob]) -> None:
    """Solve a batch and end each of its tickets (what the batch raised fails every one)."""
    if all(ticket.done() for ticket in tickets):  # cancelled while queued
        return
    try:
        solved = solve(jobs)
        for ticket, job, (outcomes, roots) in zip(tickets, jobs, solved):
            ticket._write(job, outcomes, roots)
    except BaseException as exc:  # handed to the main thread by outcome()
        for ticket in tickets:
            ticket._fail(exc)


_Work = tuple[list[Ticket], list[RootJob]] | None
_READY_SECONDS = 5.0
_THREAD_NAME = "torch_shampoo-root-"
_LIVE_POOLS: weakref.WeakSet[RootPool] = weakref.WeakSet()
_WORKERS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
"""Every worker thread this module started (a running thread is referenced by ``threading``)."""


class RootPool:
    """Daemon worker threads that solve :class:`RootJob` s from a FIFO queue.

    Each worker computes with ``threads`` intra-op threads. Threads start on the first
    :meth:`submit` in the submitting process; a forked child that inherits a pool object starts
    its own threads and never touches the parent's. :meth:`close` is idempotent, never waits for
    a running root, and is also called when the pool is collected and at interpreter exit
    (which waits for the roots being computed, at most one per worker).
    """

    def __init__(self, num_workers: int, threads: int) -> None:
        if num_workers < 1:
            raise ValueError(f"root_workers must be a positive integer, got {num_workers!r}")
        if threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.num_workers = num_workers
        self.threads = threads
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._outstanding: weakref.WeakSet[Ticket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._finalizer: weakref.finalize | None = None
        _LIVE_POOLS.add(self)

    def _start(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's threads and queue are not ours
            self._queue, self._threads, self._pid = queue.SimpleQueue(), [], os.getpid()
            self._outstanding, self._lock = weakref.WeakSet(), threading.Lock()
        if self._threads:
            return
        before, ready = torch.get_num_threads(), []
        for i in range(self.num_workers):
            ready.append(threading.Event())
            thread = threading.Thread(
                target=_work,
                args=(self._queue, self.threads, ready[-1]),
                name=f"{_THREAD_NAME}{i}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
            _WORKERS.add(thread)
        # A worker's set_num_threads also wrote torch's process-wide count, the one a thread
        # started later begins with: once the workers have set theirs, put the caller's back.
        for event in ready:
            event.wait(_READY_SECONDS)  # (bounded: a worker slow to start costs only this)
        torch.set_num_threads(before)
        self._finalizer = weakref.finalize(
            self, _stop, self._queue, len(self._threads), self._outstanding, self._lock
        )

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
        self._queue.put((queued, list(jobs)))
        return queued

    def close(self) -> None:
        """Cancel the jobs not yet solved and let the workers exit; returns at once."""
        if self._finalizer is not None and self._pid == os.getpid():
            self._finalizer()
        # The old workers exit through the old queue; a later submit starts fresh ones.
        self._queue, self._threads = queue.SimpleQueue(), []
        self._outstanding, self._lock = weakref.WeakSet(), threading.Lock()


def _work(jobs: queue.SimpleQueue[_Work], threads: int, ready: threading.Event) -> None:
    # torch gives a thread its count lazily, at its first call, from the process-wide count,
    # which every set_num_threads writes: had another thread set one between our set and our
    # first op, the worker would compute with that count (other roots' bits). Init first.
    torch.get_num_threads()
    torch.set_num_threads(threads)
    ready.set()
    while (item := jobs.get()) is not None:
        _run(*item)


def _stop(
    jobs: queue.SimpleQueue[_Work],
    workers: int,
    outstanding: weakref.WeakSet[Ticket],
    lock: threading.Lock,
) -> None:
    with lock:
        tickets = list(outstanding)
    for ticket in tickets:
        ticket.cancel("the root pool was closed before this root was computed")
    while True:  # drop what is queued; each worker then exits after its current job
        try:
            jobs.get_nowait()
        except queue.Empty:
            break
    for _ in range(workers):
        jobs.put(None)


@atexit.register
def _close_all() -> None:
    """At exit nobody will install the roots still queued: cancel them, stop the workers and
    wait for the root each of them may be in the middle of. That wait is the one place a root
    in flight is waited for: a thread still inside torch's C++ code while the interpreter
    tears torch down aborts the process."""
    for pool in list(_LIVE_POOLS):
        pool.close()
    for thread in list(_WORKERS):  # (not a thread of another copy of this module: it waits
        if thread is not threading.current_thread():  # for its own module's exit hook)
            thread.join()

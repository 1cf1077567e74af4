"""A root job, what it produced, and the ticket that promises it (:meth:`Ticket.write` is the one
code path that writes a job's result buffer)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import device

__all__ = ["RootCancelled", "RootJob", "RootOutcome", "Ticket", "outcomes_of"]


@dataclass
class RootJob:
    """The inverse roots of a (k, d, d) stack of factors, from a host snapshot."""

    snapshot: torch.Tensor
    """Host copy of the factors (pinned on CUDA); read only after ``snapshot_ready``."""
    result: torch.Tensor
    """Host buffer (pinned on CUDA) for the roots; a row whose root fails keeps what it held."""
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
    root_dtype: torch.dtype = torch.float64
    """Solve in float64, or in float32 first, a failed row again in float64 (``retried``)."""


@dataclass(frozen=True)
class RootOutcome:
    """What a job produced for one factor: ``ok``: its row of ``job.result`` is a usable root."""

    ok: bool
    error: float
    reason: str
    seconds: float
    retried: bool = False
    """Its float32 solve failed; solved again in float64 (``root_stats()["root_retries"]``)."""


class RootCancelled(RuntimeError):
    """The job's pool was closed (or the process forked) before the root was written."""


class Ticket:
    """The promise of a :class:`RootOutcome`; :meth:`outcome` blocks until it is there. A
    ticket ends exactly once: solved (the root written), failed, or cancelled."""

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
    def failed(cls, error: BaseException) -> Ticket:
        """A ticket that ended with ``error`` (:class:`RootCancelled`: computed again later)."""
        ticket = cls()
        ticket.fail(error)
        return ticket

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self._error, RootCancelled)

    def wait(self) -> None:
        self._done.wait()

    def _end(self, outcome: list[RootOutcome] | None, error: BaseException | None) -> None:
        """(Called with ``_lock`` held.)"""
        self._outcome, self._error = outcome, error
        self.finished_at = time.perf_counter()
        self._done.set()

    def fail(self, error: BaseException) -> None:
        """End the ticket with ``error`` (raised by :meth:`outcome`) unless it has ended."""
        with self._lock:
            if not self.done():
                self._end(None, error)

    def cancel(self, why: str) -> None:
        """End the ticket as cancelled unless it has ended (then :meth:`write` writes nothing)."""
        self.fail(RootCancelled(why))

    def write(self, job: RootJob, outcomes: list[RootOutcome], roots: torch.Tensor) -> None:
        """Write the usable rows of ``roots`` into ``job.result`` (after the previous upload out
        of it) and end with ``outcomes``, unless the ticket has ended (cancelled: discarded)."""
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
        """The job's outcome per factor; re-raises on the caller's thread what the job raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


def outcomes_of(ticket: Ticket, indices: Sequence[int]) -> list[RootOutcome]:
    """A job's outcome per factor (``indices``: its factors); an exception it raised fails each."""
    try:
        return ticket.outcome()
    except Exception as exc:
        return [RootOutcome(False, math.nan, f"{type(exc).__name__}: {exc}", 0.0)] * len(indices)

"""Roots in flight: one parameter's pending jobs, and the batches a hand-over forms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .jobs import RootJob, Ticket
from .staging import Staging

__all__ = ["Batch", "Pending"]


@dataclass(eq=False)
class Pending:
    """A parameter's root cycle from its snapshot to its install step: jobs, tickets, buffers."""

    submitted: int
    due: int
    jobs: list[RootJob]
    tickets: list[Ticket]
    """One per job; empty until the jobs are handed over."""
    factors: list[list[int]]
    """Per job (ticket), the indices of its factors."""
    buffers: list[Staging] = field(default_factory=list)
    """Per job, where it reads and writes (empty when no job was made)."""
    sent_at: float = 0.0
    owners: list[int] | None = None
    """Per job, the rank that solves it (``partition_roots``); None: this process solves all."""
    batches: list[Batch] = field(default_factory=list)
    """Per job, the batch it is solved in (empty until handed over; and for loaded roots)."""


@dataclass(eq=False)
class Batch:
    """Jobs solved together (:func:`~torch_shampoo.roots.pool.batches`), as (pending, job
    index) pairs: a root depends on its batch, so whatever solves one again solves them all."""

    members: list[tuple[Pending, int]]

    def jobs(self) -> list[RootJob]:
        return [pending.jobs[i] for pending, i in self.members]

    def work(self) -> tuple[int, int]:
        """(rows, d): what :func:`~torch_shampoo.distributed.partition_roots.assign` balances."""
        jobs = self.jobs()
        return sum(job.snapshot.shape[0] for job in jobs), jobs[0].snapshot.shape[-1]

    def tickets(self, fresh: Callable[[Ticket], bool]) -> list[Ticket]:
        """Per member, a new ticket where ``fresh(its ticket)``, else its own (which has ended)."""
        return [
            Ticket() if fresh(pending.tickets[i]) else pending.tickets[i]
            for pending, i in self.members
        ]

    def adopt(self, tickets: list[Ticket]) -> None:
        for (pending, i), ticket in zip(self.members, tickets):
            pending.tickets[i] = ticket

"""When roots are computed and installed: the root scheduler the engine holds (first cycles in
their own step, later ones s steps later; docs/design.md)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import device
from ..config import world_size
from ..distributed.partition_roots import Partition, assign
from .jobs import RootCancelled, RootJob, RootOutcome, Ticket, outcomes_of
from .pending import Batch, Pending
from .pool import RootPool, batches, run_here
from .staging import UNSET, HostBuffers, Slot, Staging
from .staleness import FITTED, StalenessFit, Stats
from .threads import default_threads, team

log = logging.getLogger("torch_shampoo")

__all__ = ["FITTED", "RootScheduler", "StalenessFit"]


class RootScheduler:
    """Pending roots, host staging, the worker pool and the statistics of one optimizer."""

    def __init__(self, async_roots: bool, workers: int) -> None:
        self.async_roots, self.workers = async_roots, workers
        self.pool: RootPool | None = None
        self.host = HostBuffers()
        self.taken: list[tuple[torch.Tensor, Pending]] = []
        """Pendings taken by :meth:`take_due` whose buffers come back once their step ends."""
        self.staged: list[Pending] = []
        """Pendings whose snapshot buffers may still be read by a solve."""
        self.pending: dict[torch.Tensor, Pending] = {}
        self.unsent: list[Pending] = []
        self.due_now: list[Pending] = []
        """Pendings due in this step, handed over together by :meth:`start_due`."""
        self.stats, self.fit = Stats(), StalenessFit()
        self.pid = os.getpid()
        self.cancelled = False
        """Whether a ticket may have been cancelled since the last :meth:`revive`."""
        self.partition: Partition | None = None
        """Set when root work is shared out among the processes (``partition_roots``)."""
        self.capped_stalls = 0
        """Install steps that stalled with an auto staleness already at the frequency."""
        self.warned_capped = False

    def _pool(self) -> RootPool:
        if self.pool is None:
            self.pool = RootPool(self.workers, *team(self.workers))
        return self.pool

    def run_now(self, tasks: list[Callable[[], None]], weights: list[float], cpu: bool) -> None:
        """Tasks a step waits for (warm roots, power steps): on every core (`RootPool.run_now`)
        with sync roots on the CPU at the workers' count, else in order (docs/design.md)."""
        if cpu and tasks and not self.async_roots and torch.get_num_threads() == self.threads():
            return self._pool().run_now(tasks, weights)
        for task in tasks:
            task()

    def threads(self) -> int:
        return self.pool.threads if self.pool is not None else default_threads(self.workers)

    def close(self) -> None:
        """Stop the workers at once; roots they had not written are computed again later."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
            self.cancelled = True

    def revive(self, here: bool) -> None:
        """Compute again every cancelled root (after ``close()`` or a fork) on the pool, or on
        this thread when ``here`` (a state dict must not restart threads)."""
        if self.pid != os.getpid():
            self.pid, self.cancelled = os.getpid(), True
            for pending in self.pending.values():
                pending.tickets = [
                    t if t.done() else Ticket.failed(RootCancelled("the process forked"))
                    for t in pending.tickets
                ]
        if not self.cancelled:
            return
        self.cancelled = False
        again: dict[int, Batch] = {}
        for pending in self.pending.values():
            for ticket, batch in zip(pending.tickets, pending.batches):
                if ticket.cancelled:
                    again[id(batch)] = batch
        for batch in again.values():
            tickets = batch.tickets(lambda ticket: ticket.cancelled)
            if here:
                run_here(batch.jobs(), self.threads(), tickets)
            else:
                self._pool().submit(batch.jobs(), tickets)
            batch.adopt(tickets)

    def staleness(self, group: dict[str, Any], setting: int | None, frequency: int) -> int:
        """The staleness of a later root cycle of ``group`` (``setting`` None: auto)."""
        if setting is not None:
            return setting
        if not self.async_roots:
            return 0
        fitted, fit = group.get(FITTED), self.fit
        if world_size() > 1 or torch.are_deterministic_algorithms_enabled():
            # Ranks fitting their own timings would drift apart, and deterministic runs must not
            # depend on timings: both take the frequency.
            if fitted is None and fit.cycle_seconds is not None:
                fitted = group[FITTED] = frequency
                log.info("root_staleness='auto' set to the frequency, %d steps", frequency)
            return frequency if fitted is None else int(fitted)
        return fit.auto(group, frequency)

    def submit(
        self,
        p: torch.Tensor,
        slots: list[Slot],
        jobs: Callable[[list[Staging]], list[RootJob]] | BaseException,
        t: int,
        due: int,
        in_place: bool = True,
    ) -> bool:
        """Register the root jobs of ``p`` made at step ``t`` (one per slot), due at ``due``;
        returns whether they are due now. ``jobs`` is an exception when they could not be made:
        the roots fail. ``in_place=False``: a root due now gets a buffer of its own."""
        indices = [slot.indices for slot in slots]
        if isinstance(jobs, BaseException):
            failed = [Ticket.failed(jobs) for _ in slots]
            self.pending[p] = Pending(t, due, jobs=[], tickets=failed, factors=indices)
            return due <= t
        if due <= t and not any(slot.factors.is_cuda for slot in slots):  # no host copies
            buffers = []
            for s in slots:
                if s.triangles is not None:  # compact: full matrices of their own
                    buffers.append(Staging(torch.empty_like(s.factors), torch.empty_like(s.roots)))
                    continue
                result = s.roots if in_place else torch.empty_like(s.roots)
                buffers.append(Staging(s.factors, result, in_place=in_place))
        else:
            buffers = [self._snapshot_buffer(slot.factors) for slot in slots]
        made = jobs(buffers)
        pending = self.pending[p] = Pending(
            t, due, jobs=made, tickets=[], factors=indices, buffers=buffers
        )
        if any(b.pooled for b in buffers):
            self.staged.append(pending)
        (self.unsent if due > t else self.due_now).append(pending)
        return due <= t

    def start_due(self) -> None:
        """Hand over this step's jobs due in it, together (so that small ones share batches)."""
        if self.due_now:
            self._hand_over(self.due_now, self._now)
            self.due_now = []

    def _hand_over(
        self, pendings: list[Pending], start: Callable[[list[list[RootJob]]], list[list[Ticket]]]
    ) -> None:
        """Form the batches of these pendings' jobs and start those this process solves with
        ``start`` (all at once); another rank's (``partition_roots``) get tickets that
        ``exchange`` fills."""
        now = time.perf_counter()
        for pending in pendings:
            pending.sent_at = now
            for job, buffers in zip(pending.jobs, pending.buffers):
                if buffers.result is UNSET:  # a result buffer from here to the install's end
                    buffers.result, buffers.uploaded = self.host.take(job.snapshot)
                    job.result, job.result_free = buffers.result, buffers.uploaded
        members = [(pending, i) for pending in pendings for i in range(len(pending.jobs))]
        groups = batches([pending.jobs[i] for pending, i in members])
        formed = [Batch([members[k] for k in group]) for group in groups]
        owners = [0] * len(formed)
        if self.partition is not None:
            owners = assign([batch.work() for batch in formed], self.partition.size)
        mine = [self.partition is None or self.partition.mine(owner) for owner in owners]
        solving = iter(start([batch.jobs() for batch, m in zip(formed, mine) if m]))
        started: dict[tuple[int, int], tuple[Ticket, Batch, int]] = {}
        for batch, owner, m in zip(formed, owners, mine):
            tickets = next(solving) if m else [Ticket() for _ in batch.members]
            for (pending, i), ticket in zip(batch.members, tickets):
                started[id(pending), i] = (ticket, batch, owner)
        for pending in pendings:
            rows = [started[id(pending), i] for i in range(len(pending.jobs))]
            pending.tickets = [ticket for ticket, _, _ in rows]
            pending.batches = [batch for _, batch, _ in rows]
            if self.partition is not None:
                pending.owners = [owner for _, _, owner in rows]

    def _own(self, pending: Pending) -> list[Ticket]:
        """The tickets this process solves itself."""
        if pending.owners is None or self.partition is None:
            return pending.tickets
        mine = self.partition.mine
        return [ticket for ticket, o in zip(pending.tickets, pending.owners) if mine(o)]

    def _now(self, jobs: list[list[RootJob]]) -> list[list[Ticket]]:
        """Batches the step waits for at once: solved by this thread and the pool's threads
        together, each at the workers' thread count (docs/design.md, "Threads")."""
        return self._pool().solve_now(jobs) if jobs else []

    def _later(self, jobs: list[list[RootJob]]) -> list[list[Ticket]]:
        pool = self._pool()
        return [pool.submit(batch) for batch in jobs]

    def send(self) -> None:
        """Hand the jobs due in later steps to the pool (at the end of a step, so that workers
        never compete with the rest of the step); synchronous roots are waited for here. Host
        buffers no job can read again come back first; those no job took are released after."""
        self.start_due()  # left over if a step raised between its submits and their start
        self._give_back()
        if self.unsent:
            self._send()
        self.host.trim()

    def _send(self) -> None:
        if not self.async_roots:  # computed (and waited for) before step() returns
            self._hand_over(self.unsent, self._now)
            for pending in self.unsent:
                for ticket in self._own(pending):
                    ticket.wait()
        else:
            self._hand_over(self.unsent, self._later)
        self.unsent = []

    def take_due(
        self, p: torch.Tensor, t: int, group: dict[str, Any], frequency: int, auto: bool
    ) -> Pending | None:
        """The pending roots of ``p`` if they are due at step ``t``, waited for; a wait for a
        later cycle in async mode is a stall, which grows an auto staleness."""
        pending = self.pending.get(p)
        if pending is None or pending.due > t:
            return None
        del self.pending[p]
        self.taken.append((p, pending))
        stats = self.stats
        age = t - pending.submitted
        stats.staleness_total += age
        stats.staleness_count += 1
        stats.staleness_max = max(stats.staleness_max, age)
        own = self._own(pending)
        stalled = self.async_roots and age > 0 and not all(ticket.done() for ticket in own)
        began = time.perf_counter()
        for ticket in own:
            ticket.wait()
        self.fit.rooted = True
        if self.async_roots and age > 0 and pending.tickets:
            self.fit.cycle_ended(pending.sent_at, max(t.finished_at for t in pending.tickets))
        if stalled:
            stats.stalls += 1
            stats.stall_seconds += time.perf_counter() - began
            if auto:
                self._grow(group, t, frequency, pending)
        if pending.owners is not None and self.partition is not None:
            # the same install step on every rank (no jobs: they failed alike on every rank)
            self.partition.exchange(list(zip(pending.owners, pending.tickets, pending.jobs)))
        self._give_snapshots(pending)
        pending.batches = []  # (a batch refers to its pendings: no reference cycle left)
        return pending

    def _grow(self, group: dict[str, Any], t: int, frequency: int, pending: Pending) -> None:
        """After a stall: refit from this cycle's measured time (send → last root), and grow by
        at least one step once per install step; never shrink, never beyond the frequency."""
        current = int(group.get(FITTED) or 0)
        finished = max((ticket.finished_at for ticket in pending.tickets), default=0.0)
        needed = self.fit.steps_for(max(0.0, finished - pending.sent_at)) or current + 1
        if self.fit.grown_at != t:
            needed = max(needed, current + 1)
        grown = min(frequency, max(current, needed))
        if grown > current:
            group[FITTED] = grown
            log.info("root_staleness='auto' grown to %d steps after a stall", grown)
            self.stats.staleness_increases += 1
        elif current >= frequency and self.fit.grown_at != t:
            self.capped_stalls += 1
        self.fit.grown_at = t

    def should_warn_capped(self) -> bool:
        """Once: auto staleness is at the frequency and still stalls, and the waits cost ≥ 0.5 s
        and ≥ 10% of the time since the first step."""
        if self.warned_capped or self.capped_stalls < 3 or self.fit.first_tick is None:
            return False
        waited = self.stats.stall_seconds
        elapsed = time.perf_counter() - self.fit.first_tick
        self.warned_capped = waited >= 0.5 and waited >= 0.1 * elapsed
        return self.warned_capped

    def waited_first_cycle(self, seconds: float) -> None:
        """A first root cycle took ``seconds`` of waiting inside the step (what fits auto)."""
        self.stats.first_root_seconds += seconds
        self.fit.cycle_seconds, self.fit.rooted = seconds, True

    def _snapshot_buffer(self, factors: torch.Tensor) -> Staging:
        """A job's host buffers at its snapshot (its result's is taken when it is handed over)."""
        snapshot, uploaded = self.host.take(factors)
        device.after(uploaded, factors)  # (the snapshot's copy comes later on this stream)
        return Staging(snapshot, UNSET, pooled=True)

    def _give_snapshots(self, pending: Pending) -> bool:
        """Give back the snapshot buffers of ``pending`` if no solve can read them again (every
        job of its batches has ended, none cancelled: revived, a batch is solved again)."""
        tickets = [q.tickets[i] for batch in pending.batches for q, i in batch.members]
        if not tickets or not all(t.done() and not t.cancelled for t in tickets):
            return False
        for buffers in pending.buffers:
            if buffers.pooled:
                self.host.give(buffers.snapshot)  # (its copy in was waited for by the solve)
                buffers.snapshot = UNSET
        return True

    def _give_back(self) -> None:
        """Between steps: the buffers of the roots installed (unless put back: the step failed;
        a snapshot kept is dropped, since a batch solved again may read it), the snapshots of
        the jobs since solved (a pending dropped by a failed step: dropped)."""
        for p, pending in self.taken:
            if self.pending.get(p) is not pending:
                for buffers in pending.buffers:
                    if buffers.pooled:
                        self.host.give(buffers.result, buffers.uploaded)
                        buffers.snapshot = buffers.result = UNSET
        self.taken = []
        live = {id(q) for q in self.pending.values()}
        self.staged = [q for q in self.staged if id(q) in live and not self._give_snapshots(q)]

    @property
    def staging(self) -> dict[torch.Tensor, list[Staging]]:
        """The host buffers of each parameter's roots in flight (none for roots solved in place)."""
        return {p: q.buffers for p, q in self.pending.items() if any(b.pooled for b in q.buffers)}

    def host_buffers(self) -> list[torch.Tensor]:
        """Every host buffer held: of the roots in flight or just installed, and the free ones."""
        live = [*self.pending.values(), *(pending for _, pending in self.taken)]
        held = [b.snapshot for q in live for b in q.buffers if b.pooled]
        held += [b.result for q in live for b in q.buffers if b.pooled]
        return held + self.host.held()

    def export(self) -> dict[torch.Tensor, dict[str, Any]]:
        """The roots in flight as plain state entries (waited for, or computed here)."""
        self.send()  # jobs of a step that raised before it could send them
        self.revive(here=True)
        entries = {}
        for p, pending in self.pending.items():
            for i, ticket in enumerate(pending.tickets):
                if not ticket.done() and ticket not in self._own(pending):
                    # another rank's batch: solve this process's own snapshots (the same bits)
                    batch = pending.batches[i]
                    tickets = batch.tickets(lambda ticket: not ticket.done())
                    run_here(batch.jobs(), self.threads(), tickets)
                    batch.adopt(tickets)
            count = sum(len(indices) for indices in pending.factors)
            roots: list[torch.Tensor] = [torch.zeros(0)] * count
            ok, reasons = [False] * count, [""] * count
            for i, (ticket, indices) in enumerate(zip(pending.tickets, pending.factors)):
                for row, (j, outcome) in enumerate(zip(indices, outcomes_of(ticket, indices))):
                    if outcome.ok:
                        roots[j] = pending.buffers[i].result[row].clone()
                    ok[j], reasons[j] = outcome.ok, outcome.reason
            entries[p] = {
                "pending_due": torch.tensor(pending.due),
                "pending_submitted": torch.tensor(pending.submitted),
                "pending_ok": torch.tensor(ok),
                "pending_roots": roots,
                "pending_reasons": reasons,
            }
        return entries

    def adopt(self, p: torch.Tensor, state: dict[str, Any], groups: list[list[int]]) -> None:
        """Turn the pending entries of a loaded ``state`` into resolved tickets, one per job
        (``groups``: the factor indices of each of the parameter's jobs)."""
        roots, oks = state.pop("pending_roots"), state.pop("pending_ok").tolist()
        reasons = state.pop("pending_reasons")
        stacks = [torch.stack([state["factors"][j] for j in g]) for g in groups]
        staging = []
        for stack in stacks:
            result, uploaded = self.host.take(stack)
            device.wait(uploaded)  # (written here, on the host)
            staging.append(Staging(UNSET, result, pooled=True))
        tickets = []
        for buffers, indices in zip(staging, groups):
            for row, j in enumerate(indices):
                if oks[j]:
                    buffers.result[row].copy_(roots[j])
            outcomes = [RootOutcome(bool(oks[j]), math.nan, reasons[j], 0.0) for j in indices]
            tickets.append(Ticket.resolved(outcomes))
        submitted, due = int(state.pop("pending_submitted")), int(state.pop("pending_due"))
        self.pending[p] = Pending(
            submitted, due, jobs=[], tickets=tickets, factors=groups, buffers=staging
        )

    def clear(self) -> None:
        for pending in self.pending.values():
            pending.batches = []
        self.pending.clear()
        self.taken, self.staged, self.host = [], [], HostBuffers()
        self.unsent.clear()
        self.due_now.clear()

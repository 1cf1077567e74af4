"""Root work shared out among the processes of a ``torch.distributed`` group (DDP).

Under DDP every rank holds the same factors (the gradients are averaged before the step), so
every rank would compute the same roots. With ``partition_roots=True`` each batch of root jobs
(:func:`~torch_shampoo.roots.pool.batches`: jobs of equal size and settings, solved together)
has one owner, chosen by :func:`assign` from the global shapes alone, so every rank computes
the same assignment. Every rank still snapshots every factor at a root step (a host copy), but
only the owner solves it; at the install step, which is the same on every rank, each job's
roots and outcome flags are broadcast from its owner over a gloo group of the optimizer's own
(:class:`Partition`), so the roots are bitwise the ones one process would compute, and no rank
runs any of this code alone. A rank that needs a root before that (``state_dict()`` with roots
in flight, on rank 0 only, say) solves its own snapshots (of the job's whole batch): the same
bits, since :func:`~torch_shampoo.roots.pool.solve` is deterministic at the pool's thread count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..roots.jobs import RootJob, RootOutcome, Ticket, outcomes_of

__all__ = ["Partition", "assign"]


def assign(jobs: Sequence[tuple[int, int]], ranks: int) -> list[int]:
    """An owner per job (a batch) ``(rows, d)``, balancing the estimated root work rows × d³:
    largest first (ties in job order), each to the least-loaded rank (ties: the lowest)."""
    load = [0.0] * ranks
    owners = [0] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: (-jobs[i][0] * float(jobs[i][1]) ** 3, i))
    for i in order:
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += jobs[i][0] * float(jobs[i][1]) ** 3
    return owners


class Partition:
    """This process's place in the group that shares the root work, and the exchange."""

    def __init__(self) -> None:
        dist = torch.distributed
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        # Roots are computed and staged on the host: a gloo group moves them whatever the
        # default backend (NCCL cannot broadcast CPU tensors). Created by every rank at its
        # first step, which DDP runs in lockstep.
        self.group = dist.new_group(backend="gloo")

    def mine(self, owner: int) -> bool:
        return owner == self.rank

    def exchange(self, jobs: Sequence[tuple[int, Ticket, RootJob]]) -> None:
        """Every job's roots and outcome flags from its owner to every rank, in job order:
        ``jobs`` holds (owner, ticket, job). A rank that does not own a job receives its roots
        into a buffer of its own and ends its ticket with
        :meth:`~torch_shampoo.roots.jobs.Ticket.write`, as a worker does: after the previous
        upload out of the job's result buffer, and never into a cancelled ticket's buffer."""
        dist = torch.distributed
        for owner, ticket, job in jobs:
            rows = range(job.result.shape[0])
            flags = torch.zeros(len(rows), dtype=torch.uint8)
            if self.mine(owner):
                flags.copy_(torch.tensor([o.ok for o in outcomes_of(ticket, rows)]))
            dist.broadcast(flags, src=owner, group=self.group)
            if self.mine(owner):
                dist.broadcast(job.result, src=owner, group=self.group)
                continue
            roots = torch.empty_like(job.result)
            dist.broadcast(roots, src=owner, group=self.group)
            outcomes = [
                RootOutcome(True, 0.0, "", 0.0)
                if ok
                else RootOutcome(False, math.nan, f"failed on rank {owner}", 0.0)
                for ok in flags.tolist()
            ]
            ticket.write(job, outcomes, roots)

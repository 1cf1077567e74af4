"""Root work shared out among the processes of a ``torch.distributed`` group (DDP).

With ``partition_roots=True`` each batch of root jobs has one owner, chosen by :func:`assign`
from the global shapes alone (the same on every rank); at the install step its roots and
outcome flags are broadcast from the owner (:class:`Partition`), bitwise the roots one process
would compute (docs/design.md).
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
        # Roots are staged on the host: gloo moves them whatever the default backend (NCCL
        # cannot broadcast CPU tensors). Created by every rank at its first step, in lockstep.
        self.group = dist.new_group(backend="gloo")

    def mine(self, owner: int) -> bool:
        return owner == self.rank

    def exchange(self, jobs: Sequence[tuple[int, Ticket, RootJob]]) -> None:
        """Every job's roots and outcome flags from its owner to every rank, in job order
        (``jobs``: (owner, ticket, job)). Another rank ends its ticket with
        :meth:`~torch_shampoo.roots.jobs.Ticket.write`, as a worker does."""
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
            done = RootOutcome(True, 0.0, "", 0.0)
            failed = RootOutcome(False, math.nan, f"failed on rank {owner}", 0.0)
            ticket.write(job, [done if ok else failed for ok in flags.tolist()], roots)

"""Root work shared out among the processes of a ``torch.distributed`` group (DDP).

Under DDP every rank holds the same factors (the gradients are averaged before the step), so
every rank would compute the same roots. With ``partition_roots=True`` each batch of root jobs
(:func:`~torch_shampoo.root_pool.batches`: jobs of equal size and settings, solved together)
has one owner, chosen by :func:`assign` from the global shapes alone, so every rank computes
the same assignment. Every rank still snapshots every factor at a root step (a host copy), but
only the owner solves it; at the install step, which is the same on every rank, each job's
roots and outcome flags are broadcast from its owner over a gloo group of the optimizer's own
(:class:`Partition`), so the roots are bitwise the ones one process would compute, and no rank
runs any of this code alone. A rank that needs a root before that (``state_dict()`` with roots
in flight, on rank 0 only, say) solves its own snapshots (of the job's whole batch): the same
bits, since :func:`~torch_shampoo.root_pool.solve` is deterministic at the pool's thread count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .root_pool import RootOutcome

if TYPE_CHECKING:
    from .scheduler import Pending

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

    def exchange(self, pending: Pending) -> None:
        """Every job's roots and outcome flags from its owner to every rank, in job order."""
        from .scheduler import outcomes_of

        dist = torch.distributed
        assert pending.owners is not None
        for i, (owner, ticket, indices) in enumerate(
            zip(pending.owners, pending.tickets, pending.factors)
        ):
            if not pending.buffers:
                return  # the jobs failed before they were made, alike on every rank
            flags = torch.zeros(len(indices), dtype=torch.uint8)
            if self.mine(owner):
                flags.copy_(torch.tensor([o.ok for o in outcomes_of(ticket, indices)]))
            dist.broadcast(flags, src=owner, group=self.group)
            dist.broadcast(pending.buffers[i].result, src=owner, group=self.group)
            if not self.mine(owner) and not ticket.done():
                ticket._end(
                    [
                        RootOutcome(True, 0.0, "", 0.0)
                        if ok
                        else RootOutcome(False, math.nan, f"failed on rank {owner}", 0.0)
                        for ok in flags.tolist()
                    ],
                    None,
                )

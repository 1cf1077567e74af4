"""Optimizer state shared out among ranks (``partition_state=True``): one owner per parameter.

Each parameter's owner, chosen by :func:`~torch_shampoo.distributed.partition_roots.assign` from
the global shapes alone, keeps its state and steps it; then every parameter is broadcast from
its owner, so every rank ends the step with the replicated run's bits. :meth:`StateShares.gather`
collects the shares for ``consolidate_state_dict`` (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..layout.blocking import BlockLayout
from .partition_roots import assign

__all__ = ["StateShares", "state_cost"]


def state_cost(layout: BlockLayout, elements: int) -> int:
    """Floats of a parameter's state: three moments, a factor and a root per factored dim."""
    factors = sum(d * d for b in range(layout.num_blocks) for d in layout.factor_dims(b))
    return 3 * elements + 2 * factors


class StateShares:
    """Which rank keeps and steps each parameter, and the broadcast that ends a step."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        layouts: Sequence[BlockLayout],
        leader_of: Callable[[torch.Tensor], torch.Tensor | None] = lambda p: None,
    ) -> None:
        """``leader_of(p)``: the parameter whose owner ``p`` takes (NG+'s bias: its weight)."""
        dist = torch.distributed
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.params = list(params)
        known = {id(p) for p in params}

        def head(p: torch.Tensor) -> int:  # the parameter whose owner p takes
            leader = leader_of(p)
            return id(leader) if leader is not None and id(leader) in known else id(p)

        costs: dict[int, int] = {}
        for p, layout in zip(params, layouts):
            costs[head(p)] = costs.get(head(p), 0) + state_cost(layout, p.numel())
        keys = list(costs)  # the heads, in parameter order
        if len(keys) < self.size:  # a rank without parameters could not take part in DCP
            raise ValueError(
                f"partition_state needs at least as many parameters ({len(keys)}, a bias with "
                f"its weight counted once) as processes ({self.size})"
            )
        owners = dict(zip(keys, assign([(costs[k], 1) for k in keys], self.size)))  # cost × 1³
        self.owner = {id(p): owners[head(p)] for p in params}

    def mine(self, p: torch.Tensor) -> bool:
        return self.owner[id(p)] == self.rank

    def broadcast(self, stepped: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Every stepped parameter from its owner: ``stepped`` holds (parameter, the tensor
        its step wrote: itself, or the gathered whole of a DTensor), the same parameters on
        every rank (:meth:`check` made sure before the step)."""
        dist = torch.distributed
        for owner in range(self.size):
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p, whole in stepped:
                if self.owner[id(p)] == owner:
                    groups.setdefault((whole.device, whole.dtype), []).append(whole.detach())
            for (device, dtype), tensors in groups.items():
                if owner == self.rank:
                    flat = _flatten_dense_tensors(tensors)
                else:
                    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
                dist.broadcast(flat, src=owner)
                if owner != self.rank:
                    for t, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                        t.copy_(value)

    def check(self, stepping: Sequence[torch.Tensor]) -> None:
        """One all-gather of which parameters each rank is about to step; every rank raises the
        same error, before any state changes, if they differ (the broadcasts that end the step
        would not match: a hang, or with gloo a silent mix)."""
        if self.size == 1:
            return
        dist = torch.distributed
        has = {id(p) for p in stepping}
        on = self.params[0].device  # (NCCL: the GPU)
        mine = torch.tensor([id(p) in has for p in self.params], dtype=torch.uint8, device=on)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine)
        table = torch.stack(every).cpu().bool()  # (rank, parameter)
        differ = (table != table[0]).any(0).nonzero().flatten().tolist()
        if not differ:
            return
        which = "; ".join(
            f"parameter {i} (shape {tuple(self.params[i].shape)}) on ranks "
            f"{table[:, i].nonzero().flatten().tolist()} but not on "
            f"{(~table[:, i]).nonzero().flatten().tolist()}"
            for i in differ
        )
        raise RuntimeError(
            "partition_state: every process must step the same parameters (each is broadcast "
            f"from its owner), but these have a gradient on some ranks only: {which}"
        )

    def gather(self, share: dict[int, Any]) -> dict[int, Any]:
        """The union of every rank's ``share`` (state entries by parameter index), on every
        rank; tensors travel through the host."""
        dist = torch.distributed
        on_host = {i: {k: _to_host(v) for k, v in entry.items()} for i, entry in share.items()}
        shares: list[Any] = [None] * self.size
        dist.all_gather_object(shares, on_host)
        merged = {i: entry for other in shares for i, entry in other.items()}
        return dict(sorted(merged.items()))


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    return value

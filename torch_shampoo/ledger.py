"""The engine's book of its parameters: where each one is, its layout, its state (created, or
checked once per layout, state object and dtype), the bucket plan; and :class:`Undo`, which lets
a step whose roots fail past their limit leave the state as it found it.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from functools import cache
from typing import Any

import torch

from .config import EngineConfig
from .layout import compact
from .layout.blocking import BlockLayout, block_layout, output_side_layout
from .layout.buckets import Bucket, plan_buckets, slots_of
from .roots import phases as root_phases
from .roots.staging import Slot
from .state import MOMENTS, check_state, init_state, keep_bases, moments_used, recast, stored_dtype

__all__ = ["Ledger", "Undo", "layout"]


@cache  # one entry per shape and settings: a model has few (not 1,024)
def layout(
    shape: tuple[int, ...], block_size: int, max_factor_dim: int, merge: bool | str, vectors: bool
) -> BlockLayout:
    """The block layout of a parameter shape under a group's settings."""
    if len(shape) == 1 and not vectors:
        return output_side_layout(shape, block_size, False)  # no factor: the graft alone
    return block_layout(shape, block_size, max_factor_dim, merge)


States = MutableMapping[Any, Any]


class Ledger:
    """Per parameter: its index, group and checked layout; the bucket plan of all with state."""

    def __init__(
        self,
        owner: str,
        layout_of: Callable[[torch.Tensor, EngineConfig], BlockLayout],
        describe: Callable[[torch.Tensor], str],
    ) -> None:
        self.owner, self.layout_of, self.describe = owner, layout_of, describe
        self.checked: dict[torch.Tensor, tuple[BlockLayout, dict[str, Any], tuple]] = {}
        self.index: dict[int, tuple[int, dict[str, Any], torch.Tensor]] = {}
        self.buckets: list[Bucket] | None = None
        self.packed: set[int] = set()
        """``id`` of each parameter whose factors and roots view compact stacks (last plan)."""

    def locate(
        self, p: torch.Tensor, param_groups: list[dict[str, Any]]
    ) -> tuple[int, dict[str, Any]]:
        """The parameter's index (over all groups) and its group, in O(1)."""
        found = self.index.get(id(p))
        if found is None or found[2] is not p:
            pairs = ((q, g) for g in param_groups for q in g["params"])
            self.index = {id(q): (i, g, q) for i, (q, g) in enumerate(pairs)}
            found = self.index.get(id(p))
            if found is None:
                raise KeyError("parameter not in this optimizer")
        return found[0], found[1]

    def forget_groups(self) -> None:
        """A group was added: index and plan again."""
        self.index.clear()
        self.buckets = None

    def forget_all(self) -> None:
        """The state was loaded: check, index and plan again."""
        self.checked.clear()
        self.packed.clear()  # (loaded states are full matrices)
        self.forget_groups()

    def state_of(
        self, p: torch.Tensor, states: States, config: EngineConfig, created: list[torch.Tensor]
    ) -> BlockLayout:
        """Create (noted in ``created``) or check the state of ``p``; returns its layout."""
        assert p.grad is not None
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{self.owner} does not support sparse gradients (parameter {self.describe(p)})"
            )
        layout, state, dtype = self.layout_of(p, config), states[p], stored_dtype(p, config)
        if not state:
            init_state(p, state, layout, dtype)
            created.append(p)
        checked = self.checked.get(p, (None, None, None))
        same = checked[0] is layout or checked[0] == layout  # (an equal layout made anew)
        if not same or checked[1] is not state or checked[2] != (p.dtype, dtype):
            # again after a load, a block-size change or a new dtype (model.double(), state_dtype)
            if id(p) in self.packed:  # (full matrices first: packed again, maybe otherwise)
                self.packed.discard(id(p))
                state["factors"] = compact.unpacked(state["factors"])
                state["roots"] = compact.unpacked(state["roots"])
            check_state(self.owner, self.describe(p), p, state, layout)
            recast(state, p, dtype)
            self.checked[p] = (layout, state, (p.dtype, dtype))
            self.buckets = None  # a new parameter, or new state: stack again
        if keep_bases(state, config):
            self.buckets = None  # stack them with the others
        for key, used in moments_used(config).items():
            if used and key not in state:
                state[key] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                self.buckets = None  # stack it with the others
            elif key == "exp_avg" and not used and key in state:
                del state[key]  # (a checkpoint's): unused, and overwritten before any read
                self.buckets = None
        return layout

    def plan(
        self,
        param_groups: list[dict[str, Any]],
        states: States,
        config_of: Callable[[dict[str, Any]], EngineConfig],
        packed: bool | str,
    ) -> dict[int, list[Slot]]:
        """Plan the buckets of every parameter with state; returns the root slots per ``id(p)``,
        with its root phase (:mod:`.roots.phases`), from the group's shapes alone (the same
        on a resume or another rank); used where the group staggers."""
        entries, phases = [], dict[int, int]()
        for index, group in enumerate(param_groups):
            config = config_of(group)
            layouts = [self.layout_of(p, config) for p in group["params"]]
            # (every group's phases, staggered or not: turning stagger_roots on takes effect)
            costs = [root_phases.cost(layout) for layout in layouts]
            found = root_phases.balance(costs, config.frequency)
            phases.update((id(p), phase) for p, phase in zip(group["params"], found))
            for p, layout in zip(group["params"], layouts):
                state = states.get(p)
                if state and "factors" in state:
                    keep_bases(state, config)  # (a group that turned warm roots on)
                    entries.append((index, p, layout, state))
        self.buckets, placements = plan_buckets(entries, packed=packed)
        self.packed = {i for i, places in placements.items()
                       if any(b.triangles is not None for b, _ in places)}  # fmt: skip
        slots = {i: slots_of(places) for i, places in placements.items()}
        for i, phase in phases.items():
            for slot in slots.get(i, []):
                slot.phase = phase
        return slots

    def drop(self, states: States, created: list[torch.Tensor]) -> None:
        """Forget the states a step made (it raised)."""
        for p in created:
            states.pop(p, None)
            self.checked.pop(p, None)
        if created:
            self.buckets = None


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _put(state: dict[str, Any], key: str, value: Any) -> None:
    now = state.get(key)
    if isinstance(value, torch.Tensor) and isinstance(now, torch.Tensor):
        now.copy_(value)  # (a view of a bucket's stack: written through)
    elif isinstance(value, list) and isinstance(now, list) and len(now) == len(value):
        for x, v in zip(now, value):
            x.copy_(v)
    else:
        state[key] = value


class Undo:
    """Copies of what a step changes before its roots are checked (the moments only where an
    eigenbasis moves them), the states it made, the roots it took; made where roots may fail."""

    def __init__(
        self, states: list[dict[str, Any]], created: list[torch.Tensor], taken: Any, eigen: bool
    ) -> None:
        skip = () if eigen else MOMENTS  # (updated after the roots are checked)
        self.kept = [(s, {k: _copy(v) for k, v in s.items() if k not in skip}) for s in states]
        self.created = list(created)
        self.taken = taken

    def restore(self, states: States, ledger: Ledger) -> None:
        for state, kept in self.kept:
            for key, value in kept.items():
                _put(state, key, value)
        ledger.drop(states, self.created)

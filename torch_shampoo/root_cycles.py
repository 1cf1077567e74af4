"""Root cycles, the engine's side: which parameters snapshot their factors at a step, the jobs
made from their buckets' stacks, and the installation of finished roots (failures counted,
warned about, or raised before any root of the step is installed).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import device
from .config import EngineConfig, world_size
from .layout.blocking import BlockLayout
from .roots import phases
from .roots.jobs import RootJob, outcomes_of
from .roots.pending import Pending
from .roots.scheduler import RootScheduler
from .roots.staging import Slot, Staging
from .roots.staleness import FITTED
from .update import eigenbasis, warm
from .update.per_unit import Work
from .warn import user_stacklevel

__all__ = ["Front", "RootCycles", "RootFailure"]

States = Mapping[torch.Tensor, Any]


class RootFailure(RuntimeError):
    """A factor's roots failed ``max_root_failures`` times in a row (raised before any install)."""


@dataclass
class Front:
    """What the root cycles ask of the optimizer, as callables (looked up again at each call)."""

    owner: str
    """The optimizer's class name, for messages."""
    config: Callable[[dict[str, Any]], EngineConfig]
    leader_of: Callable[[torch.Tensor], torch.Tensor | None]
    followers_of: Callable[[torch.Tensor], list[torch.Tensor]]
    index_of: Callable[[torch.Tensor], int]
    """The parameter's index over all groups."""
    factor_name: Callable[[torch.Tensor, int], str]


Due = tuple[torch.Tensor, dict[str, Any], EngineConfig, dict[str, Any], Pending]
"""A parameter, its state, config and group, and its pending roots due now."""


class RootCycles:
    """The root half of a step: the scheduler, each parameter's root slots and rooted blocks."""

    def __init__(self, scheduler: RootScheduler, front: Front) -> None:
        self.scheduler, self.front = scheduler, front
        self.slots: dict[int, list[Slot]] = {}
        """Per parameter (``id``), one slot per bucket and factored dim."""
        self.rooted: dict[torch.Tensor, tuple[bool, ...] | None] = {}

    # ------------------------------------------------------------------- installs

    def rooted_blocks(
        self, p: torch.Tensor, state: dict[str, Any], layout: BlockLayout, config: EngineConfig
    ) -> tuple[bool, ...] | None:
        """Per block, are all its roots installed (an eigenbasis: any of its factors' bases,
        the others being I)? Cached; None when every block's are."""
        if p not in self.rooted:
            has_root = state["has_root"].tolist()
            k = len(has_root) // layout.num_blocks if layout.num_blocks else 0
            enough = any if config.eigenbasis and k else all  # no factor: nothing missing
            blocks = tuple(enough(has_root[b * k : (b + 1) * k]) for b in range(layout.num_blocks))
            self.rooted[p] = None if all(blocks) else blocks
        return self.rooted[p]

    def take_due(self, ready: list[tuple[Any, ...]]) -> dict[torch.Tensor, Due]:
        """The pending roots due now of every parameter of ``ready`` (p, state, config, group,
        t), waited for; if one would fail past its limit, all are put back and it raises."""
        due = {args[0]: self._due(*args) for args in ready}
        taken = {p: d for p, d in due.items() if d is not None}
        try:
            self.check(list(taken.values()))
        except RootFailure:
            self.put_back(taken)
            raise
        return taken

    def _due(
        self, p: torch.Tensor, state: dict[str, Any], config: EngineConfig, group: Any, t: int
    ) -> Due | None:
        """The pending roots of ``p`` due at its step ``t``, waited for (None: none due)."""
        pending = self.scheduler.take_due(p, t, group, config.frequency, config.staleness is None)
        return None if pending is None else (p, state, config, group, pending)

    def check(self, due: list[Due]) -> None:
        """Raise :class:`RootFailure` if a root of ``due`` failed ``max_root_failures`` times."""
        for p, state, config, _, pending in due:
            for ticket, indices in zip(pending.tickets, pending.factors):
                for j, outcome in zip(indices, outcomes_of(ticket, indices)):
                    failures = int(state["root_failures"][j]) + 1
                    if not outcome.ok and failures >= config.max_root_failures:
                        raise RootFailure(
                            f"{self.front.owner}: {self._message(p, j, pending, outcome)}; "
                            f"{failures} consecutive failures "
                            f"(max_root_failures={config.max_root_failures})"
                        ) from _cause(ticket)

    def _message(self, p: torch.Tensor, j: int, pending: Pending, outcome: Any) -> str:
        name = self.front.factor_name(p, j)
        return f"inverse root of {name} from step {pending.submitted} failed: {outcome.reason}"

    def put_back(self, taken: dict[torch.Tensor, Due]) -> None:
        """Undo :meth:`take_due` (the step that took them raised)."""
        for p, due in taken.items():
            self.scheduler.pending[p] = due[4]

    def forget(
        self, stepped: list[tuple[torch.Tensor, int]], taken: dict[torch.Tensor, Due]
    ) -> None:
        """Undo a step that raised: drop the root jobs made for each (p, t) of ``stepped`` at
        its step t, put back the roots it took (:meth:`take_due`), forget its rooted blocks."""
        roots, made = self.scheduler, set()
        for p, t in stepped:
            self.rooted.pop(p, None)
            pending = roots.pending.get(p)
            if pending is not None and pending.submitted == t:
                made.add(id(roots.pending.pop(p)))
        roots.unsent = [x for x in roots.unsent if id(x) not in made]
        roots.due_now = [x for x in roots.due_now if id(x) not in made]
        self.put_back(taken)

    def install(self, due: Due, states: States) -> None:
        """Install the pending roots of a parameter (checked by :meth:`check`) into the bucket's
        root stack; a failed one keeps the previous root, with a warning."""
        p, state, config, _, pending = due
        roots = self.scheduler
        if config.staleness is None and roots.should_warn_capped():
            warnings.warn(
                f"{self.front.owner}: the inverse roots take longer than "
                f"precondition_frequency={config.frequency} training steps, so steps keep "
                f"waiting for them (root_stats()['stalls']); raise precondition_frequency or "
                f"root_workers, or lower block_size (a root costs about block_size³)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        stats, index = roots.stats, self.front.index_of(p)
        self.rooted.pop(p, None)
        slots = self.slots.get(id(p), [])
        failed: list[tuple[int, Any]] = []
        installed: list[int] = []
        found = [outcomes_of(t, indices) for t, indices in zip(pending.tickets, pending.factors)]
        usable: dict[int, list[bool]] = {}  # (warm roots: a task per slot, see run_now)
        ups = [i for i, o in enumerate(found) if pending.buffers and not pending.buffers[i].in_place
               and any(x.ok for x in o)]  # fmt: skip

        def upload(i: int) -> None:
            ok, buffers = [o.ok for o in found[i]], pending.buffers[i]
            usable[i] = self._upload(state, config, slots[i], buffers, pending.factors[i], ok)

        roots.run_now([functools.partial(upload, i) for i in ups], [slots[i].work for i in ups],
                      config.warm_roots and p.device.type == "cpu")  # fmt: skip
        for i, (outcomes, indices) in enumerate(zip(found, pending.factors)):
            if i in usable:
                outcomes = [o if fine else warm.unusable(o) for o, fine in zip(outcomes, usable[i])]
            for j, outcome in zip(indices, outcomes):
                stats.root_seconds += outcome.seconds
                stats.roots_solved += outcome.seconds > 0  # (another rank's, or loaded: 0)
                stats.root_retries += outcome.retried
                stats.last_error[index, j] = outcome.error
                if outcome.ok:
                    installed.append(j)
                else:
                    failed.append((j, outcome))
        if installed:  # one write per flag tensor, not one per factor (thousands at block 8)
            stats.roots_computed += len(installed)
            where = _as_index(sorted(installed))
            state["root_failures"][where] = 0
            state["has_root"][where] = True
        for j, outcome in failed:
            stats.root_failures += 1
            state["root_failures"][j] += 1
            warnings.warn(
                f"{self.front.owner}: {self._message(p, j, pending, outcome)}; keeping the "
                f"previous root ({int(state['root_failures'][j])} consecutive)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        self._share_roots(p, state, states)

    def _upload(
        self,
        state: dict[str, Any],
        config: EngineConfig,
        slot: Slot,
        buffers: Staging,
        indices: list[int],
        ok: list[bool],
    ) -> list[bool]:
        """A job's usable roots from its buffer into the root stack (an eigenbasis: moments too;
        warm roots: the bases, then the roots made from them); returns which rows are usable."""
        bases = slot.bases if config.warm_roots else None  # (every member's: Ledger.plan)
        previous = slot.roots.clone() if config.eigenbasis else None
        first = None
        if previous is not None:  # blocks whose previous basis is the identity
            had = [not bool(state["has_root"][j]) for j in indices]
            first = device.small_tensor(had, previous.device) if any(had) else None
        target = slot if bases is None else Slot(indices, slot.factors, bases)  # (full matrices)
        if all(ok):
            buffers.uploaded = target.install(buffers.result)
        else:
            for row in (r for r, fine in enumerate(ok) if fine):
                buffers.uploaded = target.install(buffers.result[row], row)
        if bases is not None:
            scalars = warm.Scalars.of(config, int(state["step"]), slot.place[0].factored)
            return warm.roots_from_bases(slot, scalars, ok, power=False).tolist()  # (a sync)
        if previous is not None:
            bucket, member, dim = slot.place
            eigenbasis.change_basis(
                state, member, bucket.block_shape, dim, previous, slot.roots, first
            )
        return ok

    def _share_roots(self, p: torch.Tensor, state: dict[str, Any], states: States) -> None:
        """Copy the roots of ``p`` just installed (and their flags) into its followers."""
        for f in self.front.followers_of(p):
            mine = states.get(f)
            if not mine or len(mine["roots"]) != len(state["roots"]):
                continue  # not stepped yet: it gets them at the next install
            for src, dst in zip(state["roots"], mine["roots"]):
                dst.copy_(src)
            mine["has_root"].copy_(state["has_root"])
            mine["root_failures"].copy_(state["root_failures"])
            self.rooted.pop(f, None)

    # ------------------------------------------------------------------ this step's

    def _root_step(self, p: torch.Tensor, config: EngineConfig, t: int) -> bool:
        """Does ``p`` start a root cycle at its step ``t``?"""
        slots = self.slots.get(id(p))
        if self.front.leader_of(p) is not None or not slots:
            return False  # a follower's roots are its leader's; no factor: nothing to compute
        return phases.is_root_step(t, config.start, config.frequency, self._phase(p, config))

    def _phase(self, p: torch.Tensor, config: EngineConfig) -> int:
        """The root phase of ``p`` if its group staggers (auto: async roots in one process)."""
        slots, setting = self.slots.get(id(p)), config.stagger_roots
        on = phases.staggered(setting, self.scheduler.async_roots, world_size())
        return slots[0].phase if slots and on else 0

    def may_solve_now(
        self, p: torch.Tensor, state: dict[str, Any], config: EngineConfig, group: Any, t: int
    ) -> bool:
        """Might the roots of ``p`` be solved and installed in its step ``t``? (True if unsure.)"""
        if not self._root_step(p, config, t):
            return False
        if not all(state["has_root"].tolist()):
            return True  # a first cycle, maybe
        cycle = phases.cycle_of(t, config.frequency, self._phase(p, config))
        if cycle % config.eigh_every and not config.basis_tolerance:
            return False  # (eigenbases or warm roots: a power iteration on the device)
        if config.staleness is None:  # auto: 0 for synchronous roots, never 0 for async ones
            return not self.scheduler.async_roots
        return config.staleness == 0

    def staleness_of(self, group: dict[str, Any]) -> int | None:
        """The staleness the later cycles of ``group`` use (auto: None until fitted)."""
        setting = self.front.config(group).staleness
        if setting is not None:
            return setting
        return group.get(FITTED) if self.scheduler.async_roots else 0

    @torch.compiler.disable
    def of_this_step(
        self, work: list[Work], param_groups: list[dict[str, Any]], states: States
    ) -> None:
        """At a root step: snapshot the factors for the pool. Roots due in this same step are
        all submitted first (solved in parallel), then checked and installed before their use."""
        began = time.perf_counter()
        due_now, first = [], False
        refresh: list[tuple[Work, list[Slot]]] = []
        for w in work:
            if self._root_step(w.p, w.config, w.t):
                is_first = w.rooted is not None and not any(w.rooted)
                if self._submit(w, is_first, refresh):
                    due_now.append(w)
                    first = first or is_first
        roots = self.scheduler
        roots.start_due()  # every parameter's jobs due now, in batches
        found = [(w, self._due(w.p, w.state, w.config, w.group, w.t)) for w in due_now]
        due = [(w, d) for w, d in found if d is not None]
        self.check([d for _, d in due])
        # (after the check: it changes roots and moments; a task per warm root, per SOAP parameter)
        parts = [(w, p) for w, ss in refresh for p in ([[s] for s in ss] if w.config.warm_roots
                                                       else [ss])]  # fmt: skip
        roots.run_now([functools.partial(self._refresh, w, p) for w, p in parts], [sum(
            s.work for s in p) for _, p in parts], all(w.p.device.type == "cpu" for w, _ in parts))
        by_param = {w.p: w for w in work} if due_now else {}
        for w, d in due:
            self.install(d, states)
            for x in (w.p, *self.front.followers_of(w.p)):
                if (v := by_param.get(x)) is not None:
                    v.rooted = self.rooted_blocks(x, v.state, v.layout, v.config)
        if first and roots.async_roots:
            roots.waited_first_cycle(time.perf_counter() - began)
            for group in param_groups:  # fix "auto" now that a cycle was measured
                config = self.front.config(group)
                if config.staleness is None:
                    roots.staleness(group, None, config.frequency)

    def _submit(self, w: Work, first: bool, refresh: list[tuple[Work, list[Slot]]]) -> bool:
        """Snapshot every factor of ``w.p`` for the pool, due now for a first cycle, else after the
        group's staleness (capped at the next root step); returns whether due now. Eigenbases:
        root steps other than every ``eigh_every``-th (a first, a drifted basis) go to
        ``refresh`` instead."""
        config, t = w.config, w.t
        frequency = config.frequency
        slots = self.slots.get(id(w.p), [])
        bases = config.eigenbasis or config.warm_roots
        tolerance = config.basis_tolerance if config.warm_roots else 0.0
        cycle = phases.cycle_of(t, frequency, self._phase(w.p, config))
        between = bases and not first and cycle % config.eigh_every
        if between and not warm.drifted(slots, tolerance):  # (drifted: the exact eigh)
            refresh.append((w, slots))  # this root step's update, on the device
            return False
        if first:
            due = t
        else:
            staleness = self.scheduler.staleness(w.group, config.staleness, frequency)
            due = min(t + staleness, phases.next_root_step(t, frequency, self._phase(w.p, config)))
        if config.eigenbasis and config.basis_refresh and due > t:
            refresh.append((w, slots))
        try:
            scale, exponent, epsilon, _ = warm.Scalars.of(config, t, w.layout.factored)
        except (TypeError, ValueError) as exc:  # a broken damping schedule: failed roots
            return self.scheduler.submit(w.p, slots, exc, t, due)

        def jobs(staging: list[Staging]) -> list[RootJob]:
            return [
                RootJob(
                    snapshot=buffers.snapshot,
                    result=buffers.result,
                    snapshot_ready=slot.stage(buffers.snapshot),
                    result_free=buffers.uploaded,
                    scale=scale,
                    exponent=exponent,
                    epsilon=epsilon,
                    method=config.root_method,
                    relative=config.relative_epsilon,
                    eigenbasis=bases,
                    root_dtype=config.root_dtype,
                )
                for slot, buffers in zip(slots, staging)
            ]

        # an eigenbasis is installed next to the previous one (the moments move between them)
        return self.scheduler.submit(w.p, slots, jobs, t, due, in_place=not bases)

    def _refresh(self, w: Work, slots: list[Slot]) -> None:
        """One power iteration of the installed bases with the current factors: the moments
        move with them (SOAP), or the roots are made from them (warm roots); at a root step
        without exact bases, or (SOAP) while they are computed."""
        state = w.state
        for slot in slots:
            installed = [bool(state["has_root"][j]) for j in slot.indices]
            if not any(installed):
                continue
            if w.config.warm_roots and slot.bases is not None:
                scalars = warm.Scalars.of(w.config, w.t, w.layout.factored)
                warm.roots_from_bases(slot, scalars, installed, power=True)
                continue
            previous = slot.roots.clone()
            eigenbasis.refresh(slot.roots, slot.factors)
            if not all(installed):
                keep = device.small_tensor(installed, previous.device).view(-1, 1, 1)
                slot.roots.copy_(torch.where(keep, slot.roots, previous))
            bucket, member, dim = slot.place
            eigenbasis.change_basis(state, member, bucket.block_shape, dim, previous, slot.roots)


def _cause(ticket: Any) -> BaseException | None:
    try:
        ticket.outcome()
    except Exception as exc:
        return exc
    return None


def _as_index(indices: list[int]) -> slice | list[int]:
    """Sorted factor indices as a slice where they are evenly spaced (no index tensor to build)."""
    first, last = indices[0], indices[-1]
    step = indices[1] - first if len(indices) > 1 else 1
    if step > 0 and indices == list(range(first, last + 1, step)):
        return slice(first, last + 1, step)
    return indices

"""Root cycles, the engine's side: which parameters snapshot their factors at a step, the jobs
made from their buckets' stacks, and the installation of finished roots (failures counted,
warned about or raised). When roots run is the :class:`~torch_shampoo.scheduler.RootScheduler`'s
business; this mixin turns a parameter's state into its jobs and their outcomes back into state.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import device, eigenbasis, telemetry
from .blocking import BlockLayout
from .config import EngineConfig
from .root_pool import RootJob
from .scheduler import FITTED, RootScheduler, Slot, Staging, outcomes_of
from .step import Work

__all__ = ["RootCycles"]


class RootCycles:
    """Root submission and installation for :class:`~torch_shampoo.engine.PreconditionerEngine`
    (which provides the attributes and methods declared here)."""

    _roots: RootScheduler
    _async_roots: bool
    _slots: dict[int, list[Slot]]
    _rooted: dict[torch.Tensor, tuple[bool, ...] | None]
    param_groups: list[dict[str, Any]]

    def _config(self, group: dict[str, Any]) -> EngineConfig:
        raise NotImplementedError

    def _layout_of(self, p: torch.Tensor, config: EngineConfig) -> BlockLayout:
        raise NotImplementedError

    _locate: Callable[[torch.Tensor], tuple[int, dict[str, Any]]]  # (Checkpointing's)

    def _rooted_blocks(
        self, p: torch.Tensor, state: dict[str, Any], layout: BlockLayout, config: EngineConfig
    ) -> tuple[bool, ...] | None:
        raise NotImplementedError

    def _leader_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The parameter whose roots ``p`` uses instead of computing its own (NG+: a hooked
        layer's bias shares its weight's F, hence its inverse); None: its own."""
        return None

    def _followers_of(self, p: torch.Tensor) -> list[torch.Tensor]:
        """The parameters whose leader is ``p``."""
        return []

    @torch.compiler.disable
    def _roots_of_this_step(self, work: list[Work]) -> None:
        """At a root step: snapshot the factors (after this step's statistics) for the pool.
        Roots due in this same step (a first cycle, or staleness 0) are all submitted first,
        so the workers solve them in parallel, then installed before they are used."""
        began = time.perf_counter()
        due_now, first = [], False
        for w in work:
            config, t = w.config, w.t
            if self._leader_of(w.p) is not None:
                continue  # its leader's roots are copied in when they are installed
            if not self._slots.get(id(w.p)):
                continue  # no factor: nothing to compute (nor to count in the statistics)
            if t == config.start or (t > config.start and t % config.frequency == 0):
                is_first = w.rooted is not None and not any(w.rooted)
                if self._submit_roots(w, is_first):
                    due_now.append(w)
                    first = first or is_first
        self._roots.start_due()  # every parameter's jobs due now, in batches
        by_param = {w.p: w for w in work} if due_now else {}
        for w in due_now:
            self._install_due_roots(w.p, w.state, w.config, w.group, w.t)
            for x in (w.p, *self._followers_of(w.p)):
                if x in by_param:
                    follower = by_param[x]
                    follower.rooted = self._rooted_blocks(
                        x, follower.state, follower.layout, follower.config
                    )
        if first and self._async_roots:
            self._roots.waited_first_cycle(time.perf_counter() - began)
            for group in self.param_groups:  # fix "auto" now that a cycle was measured
                config = self._config(group)
                if config.staleness is None:
                    self._roots.staleness(group, None, config.frequency)

    @torch.compiler.disable
    def _send_roots(self) -> None:
        """Hand this step's deferred root jobs to the pool. They are sent once every parameter
        is updated, so that the workers do not compete with the rest of the step for the CPU
        (and, on CUDA, so that the step's kernels are queued before the host waits on copies)."""
        self._roots.send()

    def _submit_roots(self, w: Work, first: bool) -> bool:
        """Snapshot every factor of ``w.p`` for the pool (one job per bucket and factored dim),
        due at a fixed step: this one for a first cycle, else after the group's staleness
        (capped at the next root step). Returns whether the roots are due in this step.
        Eigenbases: only every ``eigh_every``-th root step (and a first) makes jobs; the others
        refresh the installed bases by a power iteration instead."""
        config, t = w.config, w.t
        frequency = config.frequency
        slots = self._slots.get(id(w.p), [])
        if config.eigenbasis and not first and (t // frequency) % config.eigh_every:
            self._refresh_bases(w.state, slots)  # this root step's update, on the device
            return False
        if first:
            due = t
        else:
            staleness = self._roots.staleness(w.group, config.staleness, frequency)
            due = min(t + staleness, (t // frequency + 1) * frequency)
        beta2 = config.beta2
        scale = 1.0 - beta2**t if config.bias_correction and beta2 < 1.0 else 1.0
        if config.eigenbasis and config.basis_refresh and due > t:
            self._refresh_bases(w.state, slots)
        try:
            epsilon = config.epsilon_at(t)
        except (TypeError, ValueError) as exc:  # a broken damping schedule: failed roots
            return self._roots.submit(w.p, slots, exc, t, due)
        exponent = config.root_exponent or 2.0 * sum(w.layout.factored)

        def jobs(staging: list[Staging]) -> list[RootJob]:
            return [
                RootJob(
                    snapshot=buffers.snapshot,
                    result=buffers.result,
                    snapshot_ready=device.to_host(buffers.snapshot, slot.snapshot()),
                    result_free=buffers.uploaded,
                    scale=scale,
                    exponent=exponent,
                    epsilon=epsilon,
                    method=config.root_method,
                    relative=config.relative_epsilon,
                    eigenbasis=config.eigenbasis,
                )
                for slot, buffers in zip(slots, staging)
            ]

        # an eigenbasis is installed next to the previous one (the moments move between them)
        return self._roots.submit(w.p, slots, jobs, t, due, in_place=not config.eigenbasis)

    def _refresh_bases(self, state: dict[str, Any], slots: list[Slot]) -> None:
        """At a root step without exact bases, or while they are computed off the step, the
        installed bases take one power iteration with the current factors
        (:func:`~torch_shampoo.eigenbasis.refresh`), the moments moving with them; blocks
        without a basis yet keep the identity."""
        for slot in slots:
            installed = [bool(state["has_root"][j]) for j in slot.indices]
            if not any(installed):
                continue
            previous = slot.roots.clone()
            eigenbasis.refresh(slot.roots, slot.factors)
            if not all(installed):
                keep = device.small_tensor(installed, previous.device).view(-1, 1, 1)
                slot.roots.copy_(torch.where(keep, slot.roots, previous))
            bucket, member, dim = slot.place
            eigenbasis.change_basis(state, member, bucket.block_shape, dim, previous, slot.roots)

    def _install_due_roots(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        config: EngineConfig,
        group: dict[str, Any],
        t: int,
    ) -> None:
        """Install the pending roots of ``p`` if they are due at step ``t``: the usable ones
        are copied into the bucket's root stack (one copy per job when all of its roots are);
        a failed one keeps the previous root, with a warning, or raises after
        ``max_root_failures`` consecutive failures of the same factor."""
        roots = self._roots
        auto = config.staleness is None
        pending = roots.take_due(p, t, group, config.frequency, auto)
        if pending is None:
            return
        if auto and roots.should_warn_capped():
            warnings.warn(
                f"{type(self).__name__}: the inverse roots take longer than "
                f"precondition_frequency={config.frequency} training steps, so steps keep "
                f"waiting for them (root_stats()['stalls']); raise precondition_frequency or "
                f"root_workers, or lower block_size (a root costs about block_size³)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        stats, index = roots.stats, self._locate(p)[0]
        self._rooted.pop(p, None)
        slots = self._slots.get(id(p), [])
        failed: list[tuple[int, str, BaseException | None]] = []
        installed: list[int] = []
        for i, (ticket, indices) in enumerate(zip(pending.tickets, pending.factors)):
            outcomes = outcomes_of(ticket, indices)
            ok = [o.ok for o in outcomes]
            if pending.buffers and not pending.buffers[i].in_place and any(ok):
                buffers = pending.buffers[i]
                previous = slots[i].roots.clone() if config.eigenbasis else None
                first = None
                if previous is not None:  # blocks whose previous basis is the identity
                    had = [not bool(state["has_root"][j]) for j in indices]
                    first = device.small_tensor(had, previous.device) if any(had) else None
                if all(ok):
                    buffers.uploaded = slots[i].install(buffers.result)
                else:
                    for row in (r for r, fine in enumerate(ok) if fine):
                        buffers.uploaded = slots[i].install(buffers.result[row], row)
                if previous is not None:
                    bucket, member, dim = slots[i].place
                    eigenbasis.change_basis(
                        state, member, bucket.block_shape, dim, previous, slots[i].roots, first
                    )
            for j, outcome in zip(indices, outcomes):
                stats.root_seconds += outcome.seconds
                stats.roots_solved += outcome.seconds > 0  # (another rank's, or loaded: 0)
                stats.last_error[index, j] = outcome.error
                if outcome.ok:
                    installed.append(j)
                else:
                    failed.append((j, outcome.reason, _cause(ticket)))
        if installed:  # one write per flag tensor, not one per factor (thousands at block 8)
            stats.roots_computed += len(installed)
            where = _as_index(sorted(installed))
            state["root_failures"][where] = 0
            state["has_root"][where] = True
        for j, reason, cause in failed:
            stats.root_failures += 1
            state["root_failures"][j] += 1
            failures = int(state["root_failures"][j])
            message = (
                f"inverse root of {self._factor_name(p, j)} from step {pending.submitted} "
                f"failed: {reason}"
            )
            if failures >= config.max_root_failures:
                raise RuntimeError(
                    f"{type(self).__name__}: {message}; {failures} consecutive failures "
                    f"(max_root_failures={config.max_root_failures})"
                ) from cause
            warnings.warn(
                f"{type(self).__name__}: {message}; keeping the previous root "
                f"({failures} consecutive)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        self._share_roots(p, state)

    def _share_roots(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Copy the roots of ``p`` just installed (and their flags) into its followers."""
        for f in self._followers_of(p):
            mine = self.state.get(f)  # type: ignore[attr-defined]
            if not mine or len(mine["roots"]) != len(state["roots"]):
                continue  # not stepped yet: it gets them at the next install
            for src, dst in zip(state["roots"], mine["roots"]):
                dst.copy_(src)
            mine["has_root"].copy_(state["has_root"])
            mine["root_failures"].copy_(state["root_failures"])
            self._rooted.pop(f, None)

    # ------------------------------------------------------------------- names and stats

    def _describe(self, p: torch.Tensor) -> str:
        return f"{self._locate(p)[0]} (shape {tuple(p.shape)})"

    def _factor_name(self, p: torch.Tensor, j: int) -> str:
        """Factor ``j`` of ``p`` in words (every block has the same factored dims)."""
        layout = self._layout_of(p, self._config(self._locate(p)[1]))
        dims = [d for d, f in enumerate(layout.factored) if f]
        return f"parameter {self._describe(p)} block {j // len(dims)} dim {dims[j % len(dims)]}"

    def root_stats(self) -> dict[str, Any]:
        """Plain numbers about the inverse roots since this optimizer object was created.

        ``roots_computed`` / ``root_failures``: roots installed / rejected (non-finite or failed
        solves; the previous root stays). ``roots_solved_here``: those this process solved
        itself (with ``partition_roots``, its share; roots loaded from a checkpoint: none).
        ``stalls`` / ``stall_seconds``: steps that waited for
        a late root of a later cycle, and how long. ``first_root_seconds``: time spent waiting
        for first root cycles, which are installed in the step that computes them.
        ``root_staleness``: the staleness each group's later cycles use (an ``"auto"`` group's
        fitted value; ``None`` until it is fitted; one int when all groups agree).
        ``staleness_increases``: times an auto staleness grew after a stall.
        ``mean_staleness`` / ``max_staleness``: age in steps of the installed roots.
        ``mean_root_seconds``: solver time per root. ``pending_parameters``: parameters with
        roots in flight. ``skipped_blocks``: blocks skipped for non-finite gradients.
        ``state_bytes`` / ``host_buffer_bytes``: bytes of the optimizer state and of the host
        buffers of roots that run off the step; ``state_bytes_per_element``: state bytes per
        parameter element (Adam's float32 moments: 8).
        ``last_error``: per factor, the solver's own accuracy estimate for its last root, not a
        failure: 0.0 for the direct methods (eigh, cholesky), the residual for newton.
        """
        return telemetry.root_stats(self)  # type: ignore[arg-type]

    def _resolved_staleness(self, group: dict[str, Any]) -> int | None:
        setting = self._config(group).staleness
        if setting is not None:
            return setting
        return group.get(FITTED) if self._async_roots else 0


def _cause(ticket: Any) -> BaseException | None:
    try:
        ticket.outcome()
    except Exception as exc:
        return exc
    return None


_LIBRARY_DIRS = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by our caller point at the user's line
    (the first frame outside this package and torch: the call of ``optimizer.step()``)."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        level, frame = level + 1, frame.f_back
    return level


def _as_index(indices: list[int]) -> slice | list[int]:
    """Sorted factor indices as a slice where they are evenly spaced, as a parameter's usually
    are (a view: no index tensor to build)."""
    first, last = indices[0], indices[-1]
    step = indices[1] - first if len(indices) > 1 else 1
    if step > 0 and indices == list(range(first, last + 1, step)):
        return slice(first, last + 1, step)
    return indices

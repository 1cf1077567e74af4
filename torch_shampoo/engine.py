"""The engine Shampoo and NG+ share: Kronecker-factored statistics, CPU roots, the step.

Per block of a parameter (:mod:`torch_shampoo.blocking`), the engine keeps one statistics factor
F_i per *factored* dim, computes X_i = (F_i/bc + εI)^(−1/r) through :mod:`torch_shampoo.root_pool`
and applies the step written in :class:`PreconditionerEngine`. A front end (Shampoo, NG+) maps its
own constructor kwargs onto an :class:`EngineConfig` per parameter group and picks the layout.
When roots run is :mod:`~torch_shampoo.scheduler`'s business, the state's layout
:mod:`~torch_shampoo.state`'s, the tensor math :mod:`~torch_shampoo.kernels`' and state dicts
:mod:`~torch_shampoo.checkpoint`'s.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any, TypeVar

import torch

from . import device, kernels, step, telemetry
from .blocking import BlockLayout, block_layout
from .buckets import Bucket, plan_buckets
from .checkpoint import Checkpointing
from .config import EngineConfig
from .root_pool import RootJob, RootOutcome
from .scheduler import FITTED, RootScheduler, Staging
from .state import check_state, init_state
from .step import Work

__all__ = ["EngineConfig", "PreconditionerEngine"]


@lru_cache(maxsize=1024)
def _layout(shape: tuple[int, ...], block_size: int, max_factor_dim: int) -> BlockLayout:
    return block_layout(shape, block_size, max_factor_dim)


_Engine = TypeVar("_Engine", bound="PreconditionerEngine")


class PreconditionerEngine(Checkpointing):
    r"""A ``torch.optim.Optimizer`` preconditioning each block of a gradient with Kronecker factors.

    The step is the one written in :class:`torch_shampoo.Shampoo`'s docstring, with every setting
    taken from the group's :class:`EngineConfig`; when roots are computed and installed is the
    :class:`~torch_shampoo.scheduler.RootScheduler`'s business. A block takes the graft's
    direction until all of its roots are installed. Subclasses define :meth:`_config` and
    :meth:`_validate`, and may override :meth:`_layout_of` and :meth:`_take_curvature`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        async_roots: bool,
        root_workers: int | None,
    ) -> None:
        if not isinstance(async_roots, bool):
            raise TypeError(f"Invalid async_roots: {async_roots!r} (must be a bool)")
        if root_workers is None:
            root_workers = max(1, (os.cpu_count() or 2) // 2)
        if isinstance(root_workers, bool) or not isinstance(root_workers, int) or root_workers < 1:
            raise ValueError(f"Invalid root_workers: {root_workers!r} (must be a positive integer)")
        self._async_roots = async_roots
        self._root_workers = root_workers
        self._init_runtime()
        self._validate(defaults)
        super().__init__(params, defaults)

    def _config(self, group: dict[str, Any]) -> EngineConfig:
        """The engine settings of a parameter group."""
        raise NotImplementedError

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError naming the first bad hyperparameter of ``group``."""
        raise NotImplementedError

    def _init_runtime(self) -> None:
        """Runtime objects that are never part of the state: threads, buffers, tickets."""
        self._roots = RootScheduler(self._async_roots, self._root_workers)
        self._checked: dict[torch.Tensor, tuple[BlockLayout, dict[str, Any]]] = {}
        self._rooted: dict[torch.Tensor, tuple[bool, ...] | None] = {}
        self._index: dict[int, tuple[int, dict[str, Any], torch.Tensor]] = {}
        self._buckets: list[Bucket] | None = None
        self._loading: dict[str, Any] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group (with the defaults filled in) before adding it: a rejected group
        leaves the optimizer as it was."""
        if isinstance(param_group, dict) and "params" in param_group:
            params = param_group["params"]
            if not isinstance(params, (torch.Tensor, set)):
                param_group = {**param_group, "params": list(params)}
                params = param_group["params"]
            self._validate({**self.defaults, **param_group})
            for item in [params] if isinstance(params, torch.Tensor) else params:
                p = item[1] if isinstance(item, tuple) else item
                if isinstance(p, torch.Tensor) and (p.is_complex() or not p.is_floating_point()):
                    raise ValueError(
                        f"{type(self).__name__} optimizes real floating-point parameters, "
                        f"got dtype {p.dtype}"
                    )
        super().add_param_group(param_group)
        if hasattr(self, "_index"):
            self._index.clear()
            self._buckets = None

    # --------------------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_parameters()
        return loss

    # The step in three parts. Host-side bookkeeping (counters, state checks, root schedules,
    # thread hand-offs) runs eagerly even under torch.compile; the tensor math between it reads
    # no Python value that changes from step to step, so a compiled step does not recompile.
    def _step_parameters(self) -> None:
        work = self._begin_step()
        buckets = self._plan()
        units, stacked = self._units(work, buckets)
        for u in units:
            step.accumulate(u)
        self._statistics(units, buckets, stacked)
        self._roots_of_this_step(work)
        for u in units:
            step.directions(u)
        updates = self._precondition(units, buckets, stacked)
        for u in units:
            step.update_parameters(u, updates.get(id(u)))
        self._send_roots()

    @torch.compiler.disable
    def _begin_step(self) -> list[Work]:
        """Per parameter with a gradient: its state (created or checked), its roots due now,
        the step-dependent scalars as tensors; then the step counters advance."""
        roots = self._roots
        roots.fit.tick()
        roots.send()  # left over if the previous step raised
        roots.revive(here=False)  # roots cancelled by close() or a fork
        work = []
        for group in self.param_groups:
            config = self._config(group)
            for p in group["params"]:
                if p.grad is not None:
                    work.append(self._work_of(p, config, group))
        for w in work:
            w.state["step"] += 1
        return work

    def _work_of(self, p: torch.Tensor, config: EngineConfig, group: dict[str, Any]) -> Work:
        assert p.grad is not None
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients "
                f"(parameter {self._describe(p)})"
            )
        layout = self._layout_of(p, config)
        state = self.state[p]
        if not state:
            init_state(p, state, layout)
        checked = self._checked.get(p)
        if checked is None or checked[0] is not layout or checked[1] is not state:
            # again after a load or a block-size change
            check_state(type(self).__name__, self._describe(p), p, state, layout)
            self._checked[p] = (layout, state)
            self._buckets = None  # a new parameter, or new state: stack again
        t = int(state["step"]) + 1
        self._install_due_roots(p, state, config, group, t)
        for key, used in (
            ("momentum_buffer", config.momentum != 0),
            ("graft_v", config.grafting in ("adam", "adagrad", "rmsprop")),
        ):
            if used and key not in state:
                state[key] = torch.zeros_like(state["exp_avg"])
                self._buckets = None  # stack it with the others
        return Work(
            p=p,
            state=state,
            config=config,
            layout=layout,
            t=t,
            group=group,
            rooted=self._rooted_blocks(p, state, layout),
            curvature=self._take_curvature(p),
        )

    def _rooted_blocks(
        self, p: torch.Tensor, state: dict[str, Any], layout: BlockLayout
    ) -> tuple[bool, ...] | None:
        """Per block, are all its roots installed (cached; None when every block's are)?"""
        if p not in self._rooted:
            has_root = state["has_root"].tolist()
            k = len(has_root) // layout.num_blocks if layout.num_blocks else 0
            blocks = tuple(all(has_root[b * k : (b + 1) * k]) for b in range(layout.num_blocks))
            self._rooted[p] = None if all(blocks) else blocks
        return self._rooted[p]

    def _take_curvature(self, p: torch.Tensor) -> torch.Tensor | None:
        """Statistics prepared outside the step (NG+'s per-sample hooks); None: use G Gᵀ."""
        return None

    @torch.compiler.disable
    def _plan(self) -> list[Bucket]:
        """The buckets of every parameter with state (planned again when one is added or the
        state is loaded: its factors and roots are then copied into the stacks)."""
        if self._buckets is None:
            entries = []
            for index, group in enumerate(self.param_groups):
                config = self._config(group)
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "factors" in state:
                        entries.append((index, p, self._layout_of(p, config), state))
            self._buckets = plan_buckets(entries)
        return self._buckets

    @torch.compiler.disable
    def _roots_of_this_step(self, work: list[Work]) -> None:
        """At a root step: snapshot the factors (after this step's statistics) for the pool.
        Roots due in this same step (a first cycle, or staleness 0) are all submitted first,
        so the workers solve them in parallel, then installed before they are used."""
        began = time.perf_counter()
        due_now, first = [], False
        for w in work:
            config, t = w.config, w.t
            if t == config.start or (t > config.start and t % config.frequency == 0):
                is_first = w.rooted is not None and not any(w.rooted)
                if self._submit_roots(w, is_first):
                    due_now.append(w)
                    first = first or is_first
        for w in due_now:
            self._install_due_roots(w.p, w.state, w.config, w.group, w.t)
            w.rooted = self._rooted_blocks(w.p, w.state, w.layout)
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

    def _layout_of(self, p: torch.Tensor, config: EngineConfig) -> BlockLayout:
        return _layout(tuple(p.shape), config.block_size, config.max_factor_dim)

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return self._locate(p)[1]

    def _locate(self, p: torch.Tensor) -> tuple[int, dict[str, Any]]:
        """The parameter's index (over all groups) and its group, in O(1)."""
        found = self._index.get(id(p))
        if found is None or found[2] is not p:
            pairs = ((q, g) for g in self.param_groups for q in g["params"])
            self._index = {id(q): (i, g, q) for i, (q, g) in enumerate(pairs)}
            found = self._index.get(id(p))
            if found is None:
                raise KeyError("parameter not in this optimizer")
        return found[0], found[1]

    @torch.compiler.disable
    def _units(
        self, work: list[Work], buckets: list[Bucket]
    ) -> tuple[list[step.Unit], dict[int, step.Unit]]:
        """The step's units: each bucket with stacked moments whose parameters all step now (at
        the same step count) as one unit, every other parameter on its own. Also returns the
        stacked units by bucket (``id``)."""
        by_param = {w.p: w for w in work}
        units, stacked, covered = [], {}, set()
        for bucket in buckets:
            if not bucket.moments:
                continue
            works = [by_param.get(m.p) for m in bucket.members]
            if all(w is not None and w.curvature is None and w.t == works[0].t for w in works):
                unit = stacked[id(bucket)] = step.make_unit(works, bucket)  # type: ignore[arg-type]
                units.append(unit)
                covered.update(id(m.p) for m in bucket.members)
        units += [step.make_unit([w], None) for w in work if id(w.p) not in covered]
        return units, stacked

    def _statistics(
        self, units: list[step.Unit], buckets: list[Bucket], stacked: dict[int, step.Unit]
    ) -> None:
        """F ← β₂F + w·G Gᵀ per bucket and factored dim: one batched product each."""
        single = {u.works[0].p: u for u in units if u.bucket is None and u.g is not None}
        for bucket in buckets:
            if not bucket.factors:
                continue
            unit = stacked.get(id(bucket))
            if unit is not None:
                assert unit.g is not None
                rows, blocks, flags = None, unit.g, unit.cells
            else:
                members = [m for m in bucket.members if m.p in single]
                if not members:
                    continue
                parts = [single[m.p] for m in members]
                rows = bucket.rows(members)
                blocks = bucket.gather([u.g for u in parts], members)  # type: ignore[misc]
                flags = None
                if parts[0].cells is not None:
                    flags = torch.cat([m.flags(u.cells) for m, u in zip(members, parts)])  # type: ignore[arg-type]
            factors = bucket.factors if rows is None else [f[rows] for f in bucket.factors]
            beta2 = (unit or parts[0]).config.beta2
            kernels.accumulate_statistics(factors, blocks, bucket.factored, beta2, flags)
            if rows is not None:
                for whole, part in zip(bucket.factors, factors):
                    whole.index_copy_(0, rows, part)
        for u in units:
            u.g = None  # the gradient copies are not needed any more

    def _precondition(
        self, units: list[step.Unit], buckets: list[Bucket], stacked: dict[int, step.Unit]
    ) -> dict[int, torch.Tensor]:
        """Shampoo's grafted direction per bucket, for the parameters that use their roots in
        this step; returned per unit (``id``) in the unit's shape."""
        single = {u.works[0].p: u for u in units if u.bucket is None}
        updates: dict[int, torch.Tensor] = {}
        targets: dict[torch.Tensor, torch.Tensor] = {}
        for bucket in buckets:
            unit = stacked.get(id(bucket))
            if unit is not None:
                parts, members = [unit], bucket.members
                if not unit.works[0].preconditioned:
                    continue
                m_hat, direction = unit.m_hat, unit.direction
            else:
                members = [
                    m for m in bucket.members if m.p in single and single[m.p].works[0].uses_roots
                ]
                if not members:
                    continue
                parts = [single[m.p] for m in members]
                m_hat = bucket.gather([u.m_hat for u in parts], members)  # type: ignore[misc]
                direction = None
                if parts[0].direction is not None:
                    same = all(u.direction is u.m_hat for u in parts)
                    direction = (
                        m_hat if same else bucket.gather([u.direction for u in parts], members)
                    )  # type: ignore[misc]
            assert m_hat is not None
            works = [w for u in parts for w in u.works]
            rooted, some = None, True
            if any(w.rooted is not None for w in works):
                flags = [
                    w.rooted is None or w.rooted[b]
                    for m, w in zip(members, works)
                    for b in m.blocks
                ]
                rooted, some = torch.tensor(flags, device=m_hat.device), any(flags)
            if not some:  # the graft's direction (m̂ without one) for all of them
                if unit is not None:
                    continue
                result = m_hat if direction is None else direction
            else:
                rows = bucket.rows(members)
                roots = bucket.roots if rows is None else [r[rows] for r in bucket.roots]
                result = kernels.precondition_stack(
                    roots, m_hat, direction, bucket.factored, rooted
                )
            if unit is not None:
                updates[id(unit)] = result
            else:
                bucket.scatter(result, members, targets)
        for p, target in targets.items():
            updates[id(single[p])] = target
        return updates

    # -------------------------------------------------------------------------- the roots

    def _submit_roots(self, w: Work, first: bool) -> bool:
        """Snapshot every factor of ``w.p`` for the pool, due at a fixed step: this one for a
        first cycle, else after the group's staleness (capped at the next root step). Returns
        whether the roots are due in this step."""
        config, state, t = w.config, w.state, w.t
        frequency = config.frequency
        if first:
            due = t
        else:
            staleness = self._roots.staleness(w.group, config.staleness, frequency)
            due = min(t + staleness, (t // frequency + 1) * frequency)
        beta2 = config.beta2
        scale = 1.0 - beta2**t if config.bias_correction and beta2 < 1.0 else 1.0
        try:
            epsilon = config.epsilon_at(t)
        except (TypeError, ValueError) as exc:  # a broken damping schedule: failed roots
            return self._roots.submit(w.p, state["factors"], state["roots"], exc, t, due)
        exponents = list(self._exponents(config, w.layout))

        def jobs(staging: list[Staging]) -> list[RootJob]:
            return [
                RootJob(
                    snapshot=buffers.snapshot,
                    result=buffers.result,
                    snapshot_ready=device.to_host(buffers.snapshot, factor),
                    result_free=buffers.uploaded,
                    scale=scale,
                    exponent=exponent,
                    epsilon=epsilon,
                    method=config.root_method,
                )
                for factor, buffers, exponent in zip(state["factors"], staging, exponents)
            ]

        return self._roots.submit(w.p, state["factors"], state["roots"], jobs, t, due)

    def _install_due_roots(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        config: EngineConfig,
        group: dict[str, Any],
        t: int,
    ) -> None:
        """Install the pending roots of ``p`` if they are due at step ``t``."""
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
                stacklevel=_user_stacklevel(),
            )
        stats, index = roots.stats, self._locate(p)[0]
        self._rooted.pop(p, None)
        for j, ticket in enumerate(pending.tickets):
            cause: BaseException | None = None
            try:
                outcome = ticket.outcome()
            except Exception as exc:  # a failing root must not take training down with it
                cause = exc
                outcome = RootOutcome(False, math.nan, f"{type(exc).__name__}: {exc}", 0.0)
            stats.root_seconds += outcome.seconds
            stats.last_error[index, j] = outcome.error
            if outcome.ok:
                stats.roots_computed += 1
                state["root_failures"][j] = 0
                state["has_root"][j] = True
                buffers = pending.buffers[j]
                if buffers.result is not state["roots"][j]:  # else written in place
                    buffers.uploaded = device.to_device(state["roots"][j], buffers.result)
                continue
            stats.root_failures += 1
            state["root_failures"][j] += 1
            failures = int(state["root_failures"][j])
            message = (
                f"inverse root of {self._factor_name(p, j)} from step {pending.submitted} "
                f"failed: {outcome.reason}"
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
                stacklevel=_user_stacklevel(),
            )

    @staticmethod
    def _exponents(config: EngineConfig, layout: BlockLayout) -> Iterator[float]:
        for b in range(layout.num_blocks):
            dims = layout.factor_dims(b)
            for _ in dims:
                yield config.root_exponent or 2.0 * len(dims)

    # ------------------------------------------------------------------- names and stats

    def _describe(self, p: torch.Tensor) -> str:
        return f"{self._locate(p)[0]} (shape {tuple(p.shape)})"

    def _factor_name(self, p: torch.Tensor, j: int) -> str:
        """Factor ``j`` of ``p`` in words (every block has the same factored dims)."""
        layout = self._layout_of(p, self._config(self._group_of(p)))
        dims = [d for d, f in enumerate(layout.factored) if f]
        return f"parameter {self._describe(p)} block {j // len(dims)} dim {dims[j % len(dims)]}"

    def root_stats(self) -> dict[str, Any]:
        """Plain numbers about the inverse roots since this optimizer object was created.

        ``roots_computed`` / ``root_failures``: roots installed / rejected (non-finite or failed
        solves; the previous root stays). ``stalls`` / ``stall_seconds``: steps that waited for
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
        return telemetry.root_stats(self)

    def _resolved_staleness(self, group: dict[str, Any]) -> int | None:
        setting = self._config(group).staleness
        if setting is not None:
            return setting
        return group.get(FITTED) if self._async_roots else 0

    # ----------------------------------------------------------- lifecycle and state dicts

    def close(self) -> None:
        """Stop the root worker threads at once (idempotent). Roots they had not finished are
        computed again by the next step (or by ``state_dict()``); nothing is lost."""
        self._roots.close()

    def __enter__(self: _Engine) -> _Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_LIBRARY_DIRS = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by our caller point at the user's line
    (the first frame outside this package and torch: the call of ``optimizer.step()``)."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        level, frame = level + 1, frame.f_back
    return level

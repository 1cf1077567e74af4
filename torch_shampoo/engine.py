"""The engine Shampoo, SOAP and NG+ share: Kronecker-factored statistics, CPU roots, the step.

Glue over its parts (:mod:`~torch_shampoo.ledger`, :mod:`~torch_shampoo.root_cycles`,
:mod:`~torch_shampoo.checkpoint`); the math is :mod:`~torch_shampoo.update.per_unit`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TextIO, TypeVar

import torch

from . import checkpoint, device, telemetry
from . import plan as planning
from .config import EngineConfig, revalidate, world_size
from .distributed import dtensor
from .distributed.partition_roots import Partition
from .distributed.partition_state import StateShares
from .layout.blocking import BlockLayout
from .layout.buckets import Bucket, advance_steps
from .ledger import Ledger, Undo, layout
from .root_cycles import Front, RootCycles, RootFailure
from .roots import threads
from .roots.scheduler import RootScheduler
from .update import bucketed, eigenbasis, foreach, per_unit
from .update.per_unit import Work

__all__ = ["EngineConfig", "PreconditionerEngine"]

_Engine = TypeVar("_Engine", bound="PreconditionerEngine")


class PreconditionerEngine(torch.optim.Optimizer):
    r"""A ``torch.optim.Optimizer`` preconditioning each block of a gradient with Kronecker factors.

    The step is the one in :class:`torch_shampoo.Shampoo`'s docstring, every setting from the
    group's :class:`EngineConfig`. Subclasses define :meth:`_config` and :meth:`_validate`, and
    may override :meth:`_layout_of`, :meth:`_take_curvature`, :meth:`_leader_of` and
    :meth:`_followers_of`.
    """

    _ADDED_GROUP_KEYS: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """Group settings added since a front end's first release, each with the value that keeps
    the behaviour of a state dict or pickle saved without it (filled in on loading)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        async_roots: bool | str,
        root_workers: int | None,
        partition_roots: bool = False,
        partition_state: bool = False,
        compact_state: bool | str = False,
    ) -> None:
        # (the flags are checked by the front ends: settings.parse)
        root_workers = root_workers or max(1, (os.cpu_count() or 2) // 2)
        self._async_roots, self._root_workers = async_roots is not False, root_workers
        self._partition_roots, self._partition_state = partition_roots, partition_state
        self._compact_state = compact_state
        self._init_runtime()
        self._validate(defaults)
        super().__init__(params, defaults)
        if async_roots == "auto":  # (the parameters' devices known now; pickled as decided)
            devices = (p.device for g in self.param_groups for p in g["params"])
            self._async_roots = threads.spare_cores(devices, root_workers)
            self._cycles.scheduler.async_roots = self._async_roots

    def _config(self, group: dict[str, Any]) -> EngineConfig:
        """The engine settings of a parameter group."""
        raise NotImplementedError

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError naming the first bad hyperparameter of ``group``."""
        raise NotImplementedError

    def _layout_of(self, p: torch.Tensor, config: EngineConfig) -> BlockLayout:
        c = config
        shape = tuple(p.shape)
        return layout(shape, c.block_size, c.max_factor_dim, c.merge_dims, c.precondition_1d)

    def _take_curvature(self, p: torch.Tensor) -> torch.Tensor | None:
        """Statistics prepared outside the step (NG+'s per-sample hooks); None: use G Gᵀ."""
        return None

    def _leader_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The parameter whose roots ``p`` uses (NG+: a hooked layer's bias, its weight's)."""
        return None

    def _followers_of(self, p: torch.Tensor) -> list[torch.Tensor]:
        """The parameters whose leader is ``p``."""
        return []

    def _init_runtime(self) -> None:
        """Runtime objects that are never part of the state: threads, buffers, tickets."""
        owner = type(self).__name__
        self._ledger = Ledger(owner, lambda p, c: self._layout_of(p, c), self._describe)
        # (each looked up at the call: front ends and tests replace them on the object)
        front = Front(owner, lambda g: self._config(g), lambda p: self._leader_of(p),
                      lambda p: self._followers_of(p), lambda p: self._locate(p)[0],
                      lambda p, j: self._factor_name(p, j))  # fmt: skip
        self._cycles = RootCycles(RootScheduler(self._async_roots, self._root_workers), front)
        self._loading: dict[str, Any] | None = None
        self._shares: StateShares | None = None  # partition_state: the owners
        self._seen_groups: dict[int, list[Any]] = {}  # the settings last validated
        self._consolidated: dict[str, Any] | None = None
        self._spread = False  # this rank's state is a share

    # The parts' state, by the names tests and front ends know.
    _roots = property(lambda self: self._cycles.scheduler)
    _slots = property(lambda self: self._cycles.slots)
    _buckets = property(lambda self: self._ledger.buckets)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group (defaults filled in) first: a rejected group changes nothing."""
        if isinstance(param_group, dict) and "params" in param_group:
            params = param_group["params"]
            if not isinstance(params, (torch.Tensor, set)):
                param_group = {**param_group, "params": list(params)}
                params = param_group["params"]
            self._validate({**self.defaults, **param_group})
            for item in [params] if isinstance(params, torch.Tensor) else params:
                p = item[1] if isinstance(item, tuple) else item
                dtensor.check_parameter(p, type(self).__name__)
        if getattr(self, "_shares", None) is not None:
            raise RuntimeError("partition_state: add parameter groups before the first step")
        super().add_param_group(param_group)
        if hasattr(self, "_ledger"):
            self._ledger.forget_groups()

    # --------------------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._step_parameters()  # a traced step keeps the thread's floating-point mode
        else:
            with device.subnormals_flushed():
                self._step_parameters()
        return loss

    # Host-side bookkeeping runs eagerly even under torch.compile; the tensor math between it
    # reads no Python value that changes from step to step, so a compiled step does not recompile.
    def _step_parameters(self) -> None:
        work, buckets, stepped, undo = self._begin_step()
        try:
            units, stacked = per_unit.units_of(work, buckets)
            per_unit.mark_finite(units)
            roots = self._cycles.of_this_step  # (not traced)
            if any(w.config.eigenbasis for w in work):
                eigenbasis.step_units(
                    units, buckets, stacked, lambda: roots(work, self.param_groups, self.state)
                )
            else:
                plan = foreach.gradients(units)
                bucketed.statistics(units, buckets, stacked, keep_gradients=True)
                roots(work, self.param_groups, self.state)
                foreach.moments(units, plan)
                foreach.directions(units, plan)
                updates = bucketed.precondition(units, buckets, stacked)
                foreach.update_parameters(units, updates, plan)
        except RootFailure:
            self._undo(undo, work)
            raise
        self._finish_step(stepped)

    @torch.compiler.disable
    def _undo(self, undo: Undo | None, work: list[Work]) -> None:
        """Leave the state, and the roots, as if the step had not happened."""
        assert undo is not None  # (roots fail within a step only where they may be solved)
        undo.restore(self.state, self._ledger)
        self._cycles.forget([(w.p, w.t) for w in work], undo.taken)

    @torch.compiler.disable
    def _finish_step(self, stepped: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Parameters from their owners, DTensors' rows written back; then roots go to the pool."""
        if self._shares is not None:
            self._shares.broadcast(stepped)
        for p, whole in stepped:
            dtensor.write_back(p, whole)
        self._cycles.scheduler.send()

    @torch.compiler.disable
    def _begin_step(
        self,
    ) -> tuple[list[Work], list[Bucket], list[tuple[torch.Tensor, Any]], Undo | None]:
        """Per parameter with a gradient: its state (created or checked), its roots due now
        (checked, then installed); the buckets, what the step may undo; the counters advance."""
        revalidate(self.param_groups, self._seen_groups, self._validate)
        roots, shares = self._cycles.scheduler, self._state_shares()
        if shares is not None:  # before any state changes (and any DTensor's gathers)
            shares.check([p for g in self.param_groups for p in g["params"] if p.grad is not None])
        wanted = getattr(self, "_partition_roots", False)  # (absent from earlier pickles)
        if wanted and shares is None and roots.partition is None and world_size() > 1:
            roots.partition = Partition()  # every rank at its first step (collective)
        self._spread, self._consolidated = shares is not None, None
        roots.fit.tick()
        roots.send()  # left over if the previous step raised
        roots.revive(here=False)  # roots cancelled by close() or a fork
        ready, stepped = [], []  # stepped: (p, the whole p) of every p with a gradient
        ledger, created = self._ledger, list[torch.Tensor]()
        for group in self.param_groups:
            config = self._config(group)
            for p in (p for p in group["params"] if p.grad is not None):
                stepped.append((p, dtensor.gathered(p)))  # (a collective for a DTensor)
                if shares is None or shares.mine(p):
                    layout = ledger.state_of(p, self.state, config, created)
                    ready.append((p, config, group, layout, stepped[-1][1]))
        cycles, state = self._cycles, self.state
        if ledger.buckets is None:  # planned again: a new parameter, or new state
            cycles.slots = ledger.plan(self.param_groups, state, self._config, self._compact_state)
        buckets = ledger.buckets
        assert buckets is not None
        ready_t = [(p, state[p], c, g, int(state[p]["step"]) + 1) for p, c, g, *_ in ready]
        try:
            due = cycles.take_due(ready_t)
        except RootFailure:
            ledger.drop(state, created)
            raise
        undo = None
        if any(cycles.may_solve_now(*args) for args in ready_t):  # (copies what it changes)
            eigen = any(c.eigenbasis for _, c, *_ in ready)
            undo = Undo([s for _, s, *_ in ready_t], created, due, eigen)
        work = [self._work_of(*args, due.get(args[0])) for args in ready]
        advance_steps([w.state for w in work], buckets)
        per_unit.step_scalars(work)
        return work, buckets, stepped, undo

    def _work_of(
        self, p: torch.Tensor, config: EngineConfig, group: dict[str, Any], layout: BlockLayout,
        whole: torch.Tensor, due: Any,
    ) -> Work:  # fmt: skip
        if due is not None:
            self._cycles.install(due, self.state)
        state, t = self.state[p], int(self.state[p]["step"]) + 1
        rooted = self._cycles.rooted_blocks(p, state, layout, config)
        return Work(p, state, config, layout, t, group, rooted, self._take_curvature(p), whole)

    # --------------------------------------------------------------------- names

    def _locate(self, p: torch.Tensor) -> tuple[int, dict[str, Any]]:
        return self._ledger.locate(p, self.param_groups)

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return self._locate(p)[1]

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _describe(self, p: torch.Tensor) -> str:
        return f"{self._locate(p)[0]} (shape {tuple(p.shape)})"

    def _factor_name(self, p: torch.Tensor, j: int) -> str:
        """Factor ``j`` of ``p`` in words (every block has the same factored dims)."""
        layout = self._layout_of(p, self._config(self._group_of(p)))
        dims = [d for d, f in enumerate(layout.factored) if f]
        return f"parameter {self._describe(p)} block {j // len(dims)} dim {dims[j % len(dims)]}"

    def root_stats(self) -> dict[str, Any]:
        """Plain numbers about the inverse roots: :func:`torch_shampoo.telemetry.root_stats`."""
        roots, params = self._cycles.scheduler, self._all_params()
        errors = [(i, j) for i, j in roots.stats.last_error if i < len(params)]
        names = {(i, j): self._factor_name(params[i], j) for i, j in errors}
        staleness = [self._cycles.staleness_of(group) for group in self.param_groups]
        return telemetry.root_stats(
            roots.stats, staleness, len(roots.pending), self.state, roots.host_buffers(), names
        )

    def plan(
        self,
        step_seconds: float | None = None,
        *,
        model: torch.nn.Module | None = None,
        show: bool = True,
        file: TextIO | None = None,
    ) -> planning.Plan:
        """What this optimizer will hold and compute, from its settings and shapes alone (no state
        made, nothing changed): :class:`~torch_shampoo.plan.Plan`, printed to ``file`` (stdout)
        if ``show``. ``step_seconds``: the step time the staleness is estimated at (default: the
        median step measured once stepping); ``model``: names the parameters."""
        made = planning.of_engine(type(self).__name__, self.param_groups, self._config,
                                  self._layout_of, self._leader_of, self._cycles.scheduler,
                                  self._compact_state, step_seconds, model)  # fmt: skip
        if show:
            print(made, file=file or sys.stdout)
        return made

    # -------------------------------------------------------------- state dicts, pickling

    def _state_shares(self) -> StateShares | None:
        """The owner of each parameter (``partition_state``, several processes); None: all ours."""
        if self._shares is None and getattr(self, "_partition_state", False) and world_size() > 1:
            params = self._all_params()
            layouts = [self._layout_of(p, self._config(self._group_of(p))) for p in params]
            self._shares = StateShares(params, layouts, self._leader_of)
        return self._shares

    def state_dict(self) -> dict[str, Any]:
        """The state, roots in flight included; with ``partition_state`` under DDP, the whole
        from :meth:`consolidate_state_dict`, or this rank's share when DCP asks."""
        shares = self._state_shares()
        if shares is None or not self._spread:
            return self._local_state_dict()
        owner, local, params = type(self).__name__, self._local_state_dict, self._all_params()
        return checkpoint.shared_state_dict(owner, local, shares, self._consolidated, params)

    def consolidate_state_dict(self) -> None:
        """Gather every rank's share of the state (``partition_state``; collective), so that
        ``state_dict()`` returns the whole until the next step; without shares, nothing."""
        shares = self._state_shares()
        if shares is not None:
            packed = self._local_state_dict()
            packed["state"] = shares.gather(packed["state"])
            self._consolidated = packed

    def _local_state_dict(self) -> dict[str, Any]:
        packed = super().state_dict()
        pending = self._cycles.scheduler.export()  # roots in flight, waited for
        for i, p in enumerate(self._all_params()):
            state, compact = self.state.get(p), id(p) in self._ledger.packed
            if isinstance(state, dict) and "factors" in state:
                packed["state"][i] = checkpoint.to_saved(state, pending.get(p), compact)
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as the base class does, but in each parameter's state dtype, host entries on the
        CPU, and refuse state that does not fit a parameter's layout before changing anything."""
        loading: dict[str, Any] = {}
        added = self._ADDED_GROUP_KEYS
        settings = checkpoint.settings_of(type(self), self.defaults, added)
        codec = checkpoint.Codec(type(self).__name__, settings, added, self._config,
                                 self._group_of, self._describe, self._layout_of)  # fmt: skip
        hook = checkpoint.capture(codec, self._all_params(), self._state_shares(), loading)
        handle = self.register_load_state_dict_pre_hook(hook)
        self._loading = loading
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self._loading = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        pending = self._cycles.scheduler.export()
        compact = getattr(self, "_compact_state", False)
        packed = self._ledger.packed if hasattr(self, "_ledger") else set()
        state["state"] = type(self.state)(dict, checkpoint.pickled(self.state, pending, packed))
        flags = ("_async_roots", "_root_workers", "_partition_roots", "_partition_state")
        state.update({key: getattr(self, key, False) for key in flags}, _compact_state=compact)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (a fresh object) or the last stage of :meth:`load_state_dict`."""
        loading = getattr(self, "_loading", None)
        super().__setstate__(state)
        self.__dict__.setdefault("_compact_state", False)  # pickled before it existed
        for key, value in self._ADDED_GROUP_KEYS.items():
            self.defaults.setdefault(key, value)
            for group in self.param_groups:
                group.setdefault(key, value)
        if loading is None:
            self._init_runtime()
            self._spread = bool(self.state) and self._state_shares() is not None
        else:  # replace the base class's dtype-cast copies by the saved tensors
            self._cycles.scheduler.clear()
            self._cycles.rooted.clear()
            self._ledger.forget_all()
            checkpoint.restore_loaded(self.state, loading)
            shares = self._state_shares()
            if shares is not None:  # keep this rank's share of a whole state
                for p in [p for p in self.state if not shares.mine(p)]:
                    del self.state[p]
                self._spread = True
        layout_of = lambda p: self._layout_of(p, self._config(self._group_of(p)))  # noqa: E731
        checkpoint.adopt_pending(self.state, layout_of, self._cycles.scheduler.adopt)

    # ----------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the root worker threads at once (idempotent). Roots they had not finished are
        computed again by the next step (or by ``state_dict()``); nothing is lost."""
        self._cycles.scheduler.close()

    def __enter__(self: _Engine) -> _Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

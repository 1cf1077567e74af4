"""The engine Shampoo, SOAP and NG+ share: Kronecker-factored statistics, CPU roots, the step.

Per block of a parameter (:mod:`torch_shampoo.blocking`), the engine keeps one statistics factor
F_i per *factored* dim, computes X_i = (F_i/bc + εI)^(−1/r) through :mod:`torch_shampoo.root_pool`
and applies the step written in :class:`PreconditionerEngine`. Equal-shape blocks are stacked
into buckets (:mod:`~torch_shampoo.buckets`): statistics, preconditioning and root jobs work on
whole stacks. A front end (Shampoo, SOAP, NG+) maps its kwargs onto an :class:`EngineConfig`
per group and picks the layout. This class is glue: the math is :mod:`~torch_shampoo.step`,
root cycles :mod:`~torch_shampoo.cycles`, state :mod:`~torch_shampoo.state`, ``checkpoint``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, TypeVar

import torch

from . import device, eigenbasis, elementwise, sharded, step
from .blocking import BlockLayout, block_layout, output_side_layout
from .buckets import Bucket, advance_steps, plan_buckets, slots_of
from .checkpoint import Checkpointing
from .config import EngineConfig, revalidate, world_size
from .cycles import RootCycles
from .grafting import SECOND_MOMENT
from .partition import Partition
from .scheduler import RootScheduler, Slot
from .shares import StateShares
from .state import check_state, init_state, recast, state_dtype
from .step import Work

__all__ = ["EngineConfig", "PreconditionerEngine"]


@lru_cache(maxsize=1024)
def _layout(
    shape: tuple[int, ...], block_size: int, max_factor_dim: int, merge: bool | str, vectors: bool
) -> BlockLayout:
    if len(shape) == 1 and not vectors:
        return output_side_layout(shape, block_size, False)  # no factor: the graft alone
    return block_layout(shape, block_size, max_factor_dim, merge)


_Engine = TypeVar("_Engine", bound="PreconditionerEngine")


class PreconditionerEngine(RootCycles, Checkpointing):
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
        partition_roots: bool = False,
        partition_state: bool = False,
        compact_state: bool = False,
    ) -> None:
        flags = dict(async_roots=async_roots, partition_roots=partition_roots,
                     partition_state=partition_state, compact_state=compact_state)  # fmt: skip
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"Invalid {name}: {flag!r} (must be a bool)")
        self._partition_roots, self._partition_state = partition_roots, partition_state
        self._compact_state = compact_state
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
        self._checked: dict[torch.Tensor, tuple[BlockLayout, dict[str, Any], torch.dtype]] = {}
        self._rooted: dict[torch.Tensor, tuple[bool, ...] | None] = {}
        self._index: dict[int, tuple[int, dict[str, Any], torch.Tensor]] = {}
        self._buckets: list[Bucket] | None = None
        self._slots: dict[int, list[Slot]] = {}
        self._loading: dict[str, Any] | None = None
        self._shares: StateShares | None = None  # partition_state: the owners
        self._seen_groups: dict[int, list[Any]] = {}  # the settings last validated
        self._consolidated, self._spread = None, False  # spread: this rank's is a share

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
                sharded.check_parameter(p, type(self).__name__)
        if getattr(self, "_shares", None) is not None:
            raise RuntimeError("partition_state: add parameter groups before the first step")
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
        if torch.compiler.is_compiling():
            self._step_parameters()  # a traced step keeps the thread's floating-point mode
        else:
            with device.subnormals_flushed():
                self._step_parameters()
        return loss

    # Host-side bookkeeping (counters, state checks, bucket plans, root schedules, thread
    # hand-offs) runs eagerly even under torch.compile; the tensor math between it reads no
    # Python value that changes from step to step, so a compiled step does not recompile.
    def _step_parameters(self) -> None:
        work, buckets, stepped = self._begin_step()
        units, stacked = step.units_of(work, buckets)
        step.mark_finite(units)
        if any(w.config.eigenbasis for w in work):
            eigenbasis.step_units(units, buckets, stacked, lambda: self._roots_of_this_step(work))
        else:
            plan = elementwise.accumulate(units)
            step.statistics(units, buckets, stacked)
            self._roots_of_this_step(work)
            elementwise.directions(units, plan)
            updates = step.precondition(units, buckets, stacked)
            elementwise.update_parameters(units, updates, plan)
        self._finish_step(stepped)

    @torch.compiler.disable
    def _finish_step(self, stepped: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Every stepped parameter from its owner (``partition_state``), sharded ones' rows of
        the whole written back; then the roots go to the pool."""
        if self._shares is not None:
            self._shares.broadcast(stepped)
        for p, whole in stepped:
            sharded.write_back(p, whole)
        self._send_roots()

    @torch.compiler.disable
    def _begin_step(self) -> tuple[list[Work], list[Bucket], list[tuple[torch.Tensor, Any]]]:
        """Per parameter with a gradient: its state (created or checked), the buckets (planned
        again when a parameter or its state is new), its roots due now; then the step
        counters advance."""
        revalidate(self.param_groups, self._seen_groups, self._validate)
        roots, shares = self._roots, self._state_shares()
        wanted = getattr(self, "_partition_roots", False)  # (absent from earlier pickles)
        if wanted and shares is None and roots.partition is None and world_size() > 1:
            roots.partition = Partition()  # every rank at its first step (collective)
        self._spread, self._consolidated = shares is not None, None
        roots.fit.tick()
        roots.send()  # left over if the previous step raised
        roots.revive(here=False)  # roots cancelled by close() or a fork
        ready, stepped = [], []  # stepped: (p, the whole p) of every p with a gradient
        for group in self.param_groups:
            config = self._config(group)
            for p in (p for p in group["params"] if p.grad is not None):
                stepped.append((p, sharded.gathered(p)))  # (a collective for a DTensor)
                if shares is None or shares.mine(p):
                    ready.append((p, config, group, self._state_of(p, config), stepped[-1][1]))
        buckets = self._plan()
        work = [self._work_of(*args) for args in ready]
        advance_steps([w.state for w in work], buckets)
        step.step_scalars(work)
        return work, buckets, stepped

    def _state_of(self, p: torch.Tensor, config: EngineConfig) -> BlockLayout:
        """Create or check the state of ``p``; returns its layout."""
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
        checked = self._checked.get(p, (None, None, None))
        if checked[0] is not layout or checked[1] is not state or checked[2] is not p.dtype:
            # again after a load, a block-size change or a new dtype (model.double())
            check_state(type(self).__name__, self._describe(p), p, state, layout)
            recast(state, p)
            self._checked[p] = (layout, state, p.dtype)
            self._buckets = None  # a new parameter, or new state: stack again
        for key, used in (
            ("exp_avg", config.beta1 != 0),  # with β₁ = 0 the first moment is the gradient
            ("momentum_buffer", config.momentum != 0),
            ("graft_v", config.grafting in SECOND_MOMENT),
        ):
            if used and key not in state:
                state[key] = torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)
                self._buckets = None  # stack it with the others
            elif key == "exp_avg" and not used and key in state:
                del state[key]  # (a checkpoint's): unused, and overwritten before any read
                self._buckets = None
        return layout

    def _work_of(
        self,
        p: torch.Tensor,
        config: EngineConfig,
        group: dict[str, Any],
        layout: BlockLayout,
        whole: torch.Tensor,
    ) -> Work:
        state = self.state[p]
        t = int(state["step"]) + 1
        self._install_due_roots(p, state, config, group, t)
        return Work(
            p=p,
            state=state,
            config=config,
            layout=layout,
            t=t,
            group=group,
            rooted=self._rooted_blocks(p, state, layout, config),
            curvature=self._take_curvature(p),
            param=whole,
        )

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
            self._buckets, placements = plan_buckets(entries, packed=self._compact_state)
            self._slots = {i: slots_of(places) for i, places in placements.items()}
        return self._buckets

    def _rooted_blocks(
        self, p: torch.Tensor, state: dict[str, Any], layout: BlockLayout, config: EngineConfig
    ) -> tuple[bool, ...] | None:
        """Per block, are all its roots installed (an eigenbasis: any of its factors' bases,
        the others being I)? Cached; None when every block's are."""
        if p not in self._rooted:
            has_root = state["has_root"].tolist()
            k = len(has_root) // layout.num_blocks if layout.num_blocks else 0
            enough = any if config.eigenbasis and k else all  # no factor: nothing missing
            blocks = tuple(enough(has_root[b * k : (b + 1) * k]) for b in range(layout.num_blocks))
            self._rooted[p] = None if all(blocks) else blocks
        return self._rooted[p]

    def _take_curvature(self, p: torch.Tensor) -> torch.Tensor | None:
        """Statistics prepared outside the step (NG+'s per-sample hooks); None: use G Gᵀ."""
        return None

    def _layout_of(self, p: torch.Tensor, config: EngineConfig) -> BlockLayout:
        c = config
        return _layout(tuple(p.shape), c.block_size, c.max_factor_dim, c.merge_dims, c.vectors)

    # ----------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the root worker threads at once (idempotent). Roots they had not finished are
        computed again by the next step (or by ``state_dict()``); nothing is lost."""
        self._roots.close()

    def __enter__(self: _Engine) -> _Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""State dicts and pickling for the engine: roots in flight are waited for and saved as plain
entries, loads keep every saved dtype and are checked against the layout before anything
changes, and older checkpoints are migrated.

``state_dict()`` writes schema 2: per parameter a fixed set of keys from its first step, only
tensors and string-keyed dicts of tensors (so ``torch.distributed.checkpoint`` can flatten it and
a fresh optimizer's template has every slot a checkpoint fills)::

    step, [exp_avg], [graft_v], [momentum_buffer], root_failures, has_root, skipped_blocks,
    factors {"0": F_0, ...}, roots {"0": X_0, ...}, schema (2),
    pending_due (-1: no roots in flight), pending_submitted, pending_ok (per factor),
    pending_roots {"0": (d, d), ...} (zeros where none or failed)

``load_state_dict`` reads schema 2 and the earlier layout (lists, ``pending_*`` present only
while in flight, failure reasons as strings).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from . import packing
from .blocking import BlockLayout
from .buckets import factor_groups
from .config import EngineConfig, group_defaults, world_size
from .scheduler import RootScheduler
from .shares import StateShares
from .state import SCHEMA, check_moments, check_state, in_flight, migrate, no_pending, restore

__all__ = ["SCHEMA", "Checkpointing", "check_group_keys", "from_saved", "to_saved"]

_LISTS = ("factors", "roots", "pending_roots")
_PENDING = ("pending_due", "pending_submitted", "pending_ok", "pending_roots", "pending_reasons")


def to_saved(
    state: dict[str, Any], pending: dict[str, Any] | None, compact: bool = False
) -> dict[str, Any]:
    """A parameter's runtime state (and its roots in flight) as schema 2; no tensor is copied
    except the zero slots of absent pending roots and, with ``compact`` state
    (:mod:`torch_shampoo.packing`), the factors and roots: saved as full symmetric matrices."""
    saved = {k: v for k, v in state.items() if k not in _LISTS}
    factors, roots = _full_matrices(state) if compact else (state["factors"], state["roots"])
    saved["factors"] = {str(j): f for j, f in enumerate(factors)}
    saved["roots"] = {str(j): r for j, r in enumerate(roots)}
    saved["schema"] = torch.tensor(SCHEMA)
    n = len(state["factors"])

    def empty(j: int) -> torch.Tensor:
        return torch.zeros(state["factors"][j].shape, dtype=state["factors"][j].dtype)

    if pending is None:
        saved["pending_due"] = torch.tensor(-1)
        saved["pending_submitted"] = torch.tensor(-1)
        saved["pending_ok"] = torch.zeros(n, dtype=torch.bool)
        saved["pending_roots"] = {str(j): empty(j) for j in range(n)}
    else:
        ok = pending["pending_ok"]
        saved["pending_due"] = pending["pending_due"]
        saved["pending_submitted"] = pending["pending_submitted"]
        saved["pending_ok"] = ok
        saved["pending_roots"] = {
            str(j): root if bool(ok[j]) else empty(j)
            for j, root in enumerate(pending["pending_roots"])
        }
    return saved


def _full_matrices(state: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A compact state's factors and roots as full symmetric matrices (new tensors)."""
    factors = [
        packing.full(f, torch.ones_like(f, dtype=torch.bool).tril(), upper=False)
        for f in state["factors"]
    ]
    roots = [
        packing.full(r, torch.ones_like(r, dtype=torch.bool).triu(), upper=True)
        for r in state["roots"]
    ]
    return factors, roots


def _owned(value: Any) -> Any:
    """``value`` (nested lists and dicts) with every tensor that views a larger storage (a
    bucket's stacks) cloned: pickle writes a tensor's whole storage, once per tensor."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.untyped_storage().nbytes() > value.nbytes else value
    if isinstance(value, list):
        return [_owned(v) for v in value]
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    return value


def from_saved(owner: str, name: str, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved parameter state (schema 2 or the earlier layout) in the runtime layout: lists of
    factors and roots, ``pending_*`` only while roots are in flight."""
    state = dict(saved)
    schema = state.pop("schema", None)
    if schema is not None and int(schema) != SCHEMA:
        raise ValueError(
            f"{owner} state of parameter {name} has schema {int(schema)}; this release reads "
            f"schema {SCHEMA} and the unversioned layout before it"
        )
    for key in _LISTS:
        value = state.get(key)
        if isinstance(value, dict):
            try:
                state[key] = [value[str(j)] for j in range(len(value))]
            except KeyError:
                raise ValueError(
                    f"{owner} state of parameter {name}: {key} must be keyed 0…{len(value) - 1}, "
                    f"got {sorted(value)}"
                ) from None
    if "pending_due" in state and int(state["pending_due"]) < 0:
        for key in _PENDING:
            state.pop(key, None)
    elif "pending_due" in state and "pending_reasons" not in state:
        state["pending_reasons"] = [
            "" if ok else "failed before the checkpoint" for ok in state["pending_ok"].tolist()
        ]
    return state


def check_group_keys(owner: str, groups: list[dict[str, Any]], settings: Iterable[str]) -> None:
    """Refuse saved parameter groups that lack one of ``settings``: they would replace this
    optimizer's groups and fail at a later step."""
    for index, group in enumerate(groups):
        missing = sorted(k for k in settings if k not in group)
        if missing:
            raise ValueError(
                f"{owner} state dict's param group {index} lacks {missing}: the state dict is "
                "truncated or not from this optimizer"
            )


def _called_by_dcp() -> bool:
    """Is ``state_dict()`` being called by ``torch.distributed.checkpoint`` (which calls it on
    every rank, saves the union of what they return and loads each rank its own keys)?"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class Checkpointing(Optimizer):
    """The state-dict and pickling half of :class:`~torch_shampoo.engine.PreconditionerEngine`
    (which provides the methods declared here)."""

    _ADDED_GROUP_KEYS: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """Group settings added after a front end's first release, with the value that keeps the
    behaviour a state dict or pickle without them was saved with (filled in on loading)."""

    _roots: RootScheduler
    _loading: dict[str, Any] | None
    _async_roots: bool
    _compact_state: bool
    _root_workers: int
    _checked: dict[torch.Tensor, tuple[BlockLayout, dict[str, Any], torch.dtype]]
    _rooted: dict[torch.Tensor, tuple[bool, ...] | None]
    _index: dict[int, tuple[int, dict[str, Any], torch.Tensor]]
    _buckets: list[Any] | None
    _consolidated: dict[str, Any] | None
    _spread: bool
    _shares: StateShares | None

    def _config(self, group: dict[str, Any]) -> EngineConfig:
        raise NotImplementedError

    def _settings(self) -> list[str]:
        """The group settings a saved group must have: the front end's per-group kwargs, less
        those added since its first release (loading fills them in)."""
        declared = group_defaults(dict.fromkeys(inspect.signature(type(self)).parameters))
        return [k for k in declared if k in self.defaults and k not in self._ADDED_GROUP_KEYS]

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

    def _layout_of(self, p: torch.Tensor, config: EngineConfig) -> BlockLayout:
        raise NotImplementedError

    def _describe(self, p: torch.Tensor) -> str:
        raise NotImplementedError

    def _init_runtime(self) -> None:
        raise NotImplementedError

    def _state_shares(self) -> StateShares | None:
        """The owner of each parameter (``partition_state`` with several processes), made from
        the global shapes alone when first needed; None: this process steps every parameter."""
        if self._shares is None and getattr(self, "_partition_state", False) and world_size() > 1:
            params = self._all_params()
            layouts = [self._layout_of(p, self._config(self._group_of(p))) for p in params]
            leader = getattr(self, "_leader_of", lambda p: None)
            self._shares = StateShares(params, layouts, leader)
        return self._shares

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _pending_as_state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Wait for the roots in flight and express them as plain state entries."""
        return self._roots.export()

    def _adopt_pending_state(self) -> None:
        """After a load or unpickling: old checkpoints migrated, and the pending entries turned
        into resolved tickets."""
        for p, state in self.state.items():
            if isinstance(state, dict):
                if in_flight(state):
                    layout = self._layout_of(p, self._config(self._group_of(p)))
                    self._roots.adopt(p, state, factor_groups(layout))
                    no_pending(state)
                migrate(state)

    def state_dict(self) -> dict[str, Any]:
        """The state, with roots still in flight waited for and included, so it can resume.
        With ``partition_state`` under DDP, the whole state gathered by the last
        :meth:`consolidate_state_dict`, or this rank's share when ``torch.distributed.
        checkpoint`` asks (it saves every rank's); otherwise, after a step, a RuntimeError
        (this rank holds only its share: saved alone, the others' parameters would restart)."""
        shares = self._state_shares()
        if shares is None or not self._spread:
            return self._local_state_dict()
        if self._consolidated is None and _called_by_dcp():
            share = self._local_state_dict()  # DCP: every rank saves its share, loads its own
            for i, p in enumerate(self._all_params()):
                if not shares.mine(p):  # (DCP requires an entry per parameter)
                    share["state"].setdefault(i, {})
            return share
        if self._consolidated is None:
            raise RuntimeError(
                f"{type(self).__name__}(partition_state=True): each rank holds only its share of "
                "the state; call optimizer.consolidate_state_dict() on every rank first (after "
                "the last step), then state_dict() on any of them (or save with "
                "torch.distributed.checkpoint, where every rank saves its share)"
            )
        return self._consolidated

    def consolidate_state_dict(self) -> None:
        """Gather every rank's share of the state (``partition_state``; collective: call it on
        every rank), so that ``state_dict()`` returns the whole until the next step. Without
        shares it does nothing."""
        shares = self._state_shares()
        if shares is not None:
            packed = self._local_state_dict()
            packed["state"] = shares.gather(packed["state"])
            self._consolidated = packed

    def _local_state_dict(self) -> dict[str, Any]:
        packed = super().state_dict()
        pending = self._pending_as_state()
        index = {id(p): i for i, p in enumerate(self._all_params())}
        for p, state in self.state.items():
            if isinstance(state, dict) and "factors" in state:
                i = index[id(p)]
                packed["state"][i] = to_saved(state, pending.get(p), self._compact_state)
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as the base class does (hooks included), except that floating-point state
        takes the parameter's state dtype (float32 factors of a bf16 parameter stay float32),
        host entries stay on the CPU, and state that does not fit a parameter's layout is
        refused before anything changes."""
        loading: dict[str, Any] = {}

        def capture(optimizer: Optimizer, final: dict[str, Any]) -> None:
            # Registered last, so it sees the state dict the user's pre-hooks settled on.
            loading["params"] = self._saved_id_map(final)
            loading["state"] = {}
            check_group_keys(type(self).__name__, final["param_groups"], self._settings())
            # The settings the state was saved with (they replace the groups' on loading).
            settings = {
                i: {k: v for k, v in group.items() if k != "params"}
                for group in final["param_groups"]
                for i in group["params"]
            }
            shares = self._state_shares()
            for saved_id, p in loading["params"].items():
                if shares is not None and not shares.mine(p):
                    continue  # another rank's (DCP's unflattening gives every parameter {})
                if final["state"].get(saved_id):
                    added = self._ADDED_GROUP_KEYS  # (what __setstate__ fills in)
                    config = self._config({**self._group_of(p), **added, **settings[saved_id]})
                    owner, name = type(self).__name__, self._describe(p)
                    saved = from_saved(owner, name, final["state"][saved_id])
                    check_state(owner, name, p, saved, self._layout_of(p, config))
                    check_moments(owner, name, saved, config)
                    loading["state"][saved_id] = saved

        handle = self.register_load_state_dict_pre_hook(capture)
        self._loading = loading
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self._loading = None

    def _saved_id_map(self, saved: dict[str, Any]) -> dict[Any, torch.Tensor]:
        saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
        return dict(zip(saved_ids, self._all_params()))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        pending = self._pending_as_state()
        compact = getattr(self, "_compact_state", False)
        pickled = {}
        for p, s in self.state.items():
            if isinstance(s, dict) and compact and "factors" in s:
                factors, roots = _full_matrices(s)
                s = {**s, "factors": factors, "roots": roots}
            pickled[p] = _owned({**s, **pending.get(p, {})}) if isinstance(s, dict) else s
        state["state"] = type(self.state)(dict, pickled)
        state["_async_roots"] = self._async_roots
        state["_root_workers"] = self._root_workers
        state["_partition_roots"] = getattr(self, "_partition_roots", False)
        state["_partition_state"] = getattr(self, "_partition_state", False)
        state["_compact_state"] = getattr(self, "_compact_state", False)
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
            self._roots.clear()
            self._checked.clear()
            self._buckets = None
            self._rooted.clear()
            self._index.clear()
            for saved_id, p in loading["params"].items():
                saved = loading["state"].get(saved_id)
                if saved is not None:
                    self.state[p] = {k: restore(k, v, p) for k, v in saved.items()}
            shares = self._state_shares()
            if shares is not None:  # keep this rank's share of a whole state
                for p in [p for p in self.state if not shares.mine(p)]:
                    del self.state[p]
                self._spread = True
        self._adopt_pending_state()

"""State dicts and pickling for the engine, as functions of plain data: roots in flight are
saved as plain entries, loads keep every saved dtype and are checked against the layout before
anything changes, and older layouts are migrated.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import EngineConfig, group_defaults
from .distributed.partition_state import StateShares
from .layout import compact
from .layout.blocking import BlockLayout
from .layout.buckets import factor_groups
from .state import SCHEMA, check_moments, check_state, in_flight, migrate, no_pending, restore

__all__ = [
    "SCHEMA",
    "Codec",
    "adopt_pending",
    "capture",
    "from_saved",
    "pickled",
    "restore_loaded",
    "settings_of",
    "shared_state_dict",
    "to_saved",
]

_LISTS = ("factors", "roots", "bases", "pending_roots")
_PENDING = ("pending_due", "pending_submitted", "pending_ok", "pending_roots", "pending_reasons")


def to_saved(
    state: dict[str, Any], pending: dict[str, Any] | None, compact: bool = False
) -> dict[str, Any]:
    """A parameter's runtime state (and its roots in flight) as schema 2: only tensors and dicts
    of tensors (``torch.distributed.checkpoint`` flattens it), the pending slots always filled.
    No tensor is copied but zero roots and, with ``compact`` state, the full factors and roots."""
    saved = {k: v for k, v in state.items() if k not in _LISTS}
    factors, roots = _full_matrices(state) if compact else (state["factors"], state["roots"])
    saved["factors"] = {str(j): f for j, f in enumerate(factors)}
    saved["roots"] = {str(j): r for j, r in enumerate(roots)}
    if "bases" in state:  # (warm-started roots)
        saved["bases"] = {str(j): q for j, q in enumerate(state["bases"])}
    saved["schema"] = torch.tensor(SCHEMA)

    def empty(j: int) -> torch.Tensor:
        return torch.zeros(state["factors"][j].shape, dtype=state["factors"][j].dtype)

    if pending is None:  # none in flight: -1, and no root
        n = len(state["factors"])
        pending = {"pending_due": torch.tensor(-1), "pending_submitted": torch.tensor(-1)}
        pending.update(pending_ok=torch.zeros(n, dtype=torch.bool), pending_roots=[None] * n)
    ok = pending["pending_ok"].tolist()
    saved.update((k, pending[k]) for k in ("pending_due", "pending_submitted", "pending_ok"))
    saved["pending_roots"] = {
        str(j): root if ok[j] else empty(j) for j, root in enumerate(pending["pending_roots"])
    }
    return saved


def _full_matrices(state: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A compact state's factors and roots as full symmetric matrices (new tensors)."""
    return compact.unpacked(state["factors"]), compact.unpacked(state["roots"])


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
    """A saved parameter state (schema 2 or the list layout before it) in the runtime layout."""
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


def _called_by_dcp() -> bool:
    """Is ``state_dict()`` being called by ``torch.distributed.checkpoint``?"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


@dataclass
class Codec:
    """What saving and loading ask of the optimizer, as callables."""

    owner: str
    """The optimizer's class name, for messages."""
    settings: list[str]
    added: Mapping[str, Any]
    """The front end's ``_ADDED_GROUP_KEYS``."""
    config: Callable[[dict[str, Any]], EngineConfig]
    group_of: Callable[[torch.Tensor], dict[str, Any]]
    describe: Callable[[torch.Tensor], str]
    layout_of: Callable[[torch.Tensor, EngineConfig], BlockLayout]


def settings_of(front: type, defaults: Mapping[str, Any], added: Mapping[str, Any]) -> list[str]:
    """The group settings a saved group must have: the front end's group kwargs but ``added``."""
    declared = group_defaults(dict.fromkeys(inspect.signature(front).parameters))
    return [k for k in declared if k in defaults and k not in added]


def shared_state_dict(
    owner: str,
    local: Callable[[], dict[str, Any]],
    shares: StateShares,
    consolidated: dict[str, Any] | None,
    params: list[torch.Tensor],
) -> dict[str, Any]:
    """A rank's state dict: the consolidated whole, or its share when DCP asks."""
    if consolidated is None and _called_by_dcp():
        share = local()  # DCP: every rank saves its share, loads its own
        for i, p in enumerate(params):
            if not shares.mine(p):  # (DCP requires an entry per parameter)
                share["state"].setdefault(i, {})
        return share
    if consolidated is None:
        raise RuntimeError(
            f"{owner}(partition_state=True): each rank holds only its share of "
            "the state; call optimizer.consolidate_state_dict() on every rank first (after "
            "the last step), then state_dict() on any of them (or save with "
            "torch.distributed.checkpoint, where every rank saves its share)"
        )
    return consolidated


def capture(
    codec: Codec,
    params: list[torch.Tensor],
    shares: StateShares | None,
    loading: dict[str, Any],
) -> Callable[[Any, dict[str, Any]], None]:
    """A load pre-hook (registered last: it sees what the user's pre-hooks settled on) that checks
    each saved state against its layout and keeps it in ``loading`` (``params``, ``state``)."""

    def hook(optimizer: Any, final: dict[str, Any]) -> None:
        saved_ids = [i for group in final["param_groups"] for i in group["params"]]
        loading["params"] = dict(zip(saved_ids, params))
        loading["state"] = {}
        for index, group in enumerate(final["param_groups"]):  # else it fails at a later step
            missing = sorted(k for k in codec.settings if k not in group)
            if missing:
                raise ValueError(
                    f"{codec.owner} state dict's param group {index} lacks {missing}: the state "
                    "dict is truncated or not from this optimizer"
                )
        # The settings the state was saved with (they replace the groups' on loading).
        settings = {
            i: {k: v for k, v in group.items() if k != "params"}
            for group in final["param_groups"]
            for i in group["params"]
        }
        for saved_id, p in loading["params"].items():
            if shares is not None and not shares.mine(p):
                continue  # another rank's (DCP's unflattening gives every parameter {})
            if final["state"].get(saved_id):
                config = codec.config({**codec.group_of(p), **codec.added, **settings[saved_id]})
                owner, name = codec.owner, codec.describe(p)
                saved = from_saved(owner, name, final["state"][saved_id])
                check_state(owner, name, p, saved, codec.layout_of(p, config))
                check_moments(owner, name, saved, config)
                loading["state"][saved_id] = saved

    return hook


def restore_loaded(states: dict[Any, Any], loading: dict[str, Any]) -> None:
    """The saved tensors of a load, in each parameter's state dtype, for the base class's copies."""
    for saved_id, p in loading["params"].items():
        saved = loading["state"].get(saved_id)
        if saved is not None:
            states[p] = {k: restore(k, v, p) for k, v in saved.items()}


def pickled(
    states: Mapping[Any, Any], pending: dict[torch.Tensor, dict[str, Any]], packed: Container[int]
) -> dict[Any, Any]:
    """The states as pickled: roots in flight as entries, full matrices (``packed``: ``id`` of
    each parameter whose state views compact stacks), no shared storage."""
    out = {}
    for p, s in states.items():
        if isinstance(s, dict) and id(p) in packed and "factors" in s:
            factors, roots = _full_matrices(s)
            s = {**s, "factors": factors, "roots": roots}
        out[p] = _owned({**s, **pending.get(p, {})}) if isinstance(s, dict) else s
    return out


def adopt_pending(
    states: Mapping[torch.Tensor, Any],
    layout_of: Callable[[torch.Tensor], BlockLayout],
    adopt: Callable[[torch.Tensor, dict[str, Any], list[list[int]]], None],
) -> None:
    """After a load or unpickling: old states migrated, pending entries made resolved tickets."""
    for p, state in states.items():
        if isinstance(state, dict):
            if in_flight(state):
                adopt(p, state, factor_groups(layout_of(p)))
                no_pending(state)
            migrate(state)

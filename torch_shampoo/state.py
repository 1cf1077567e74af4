"""The per-parameter state: what it holds, how it is made, checked, migrated and restored.

Every key but the moments (:data:`MOMENTS`, held where the group uses them) exists from the first
step; the ``pending_*`` slots stay empty at run time (roots in flight live in the scheduler).
"""

from __future__ import annotations

from typing import Any

import torch

from . import rounding
from .config import EngineConfig
from .layout.blocking import BlockLayout
from .update.grafting import SECOND_MOMENT

__all__ = [
    "HOST_KEYS",
    "MOMENTS",
    "check_moments",
    "check_state",
    "init_state",
    "keep_bases",
    "migrate",
    "moments_used",
    "recast",
    "restore",
    "state_dtype",
    "stored_dtype",
]

HOST_KEYS = ("step", "root_failures", "has_root", "pending_due", "pending_submitted",
             "pending_ok", "pending_roots", "schema")  # fmt: skip
"""State entries that live on the CPU whatever the parameter's device."""

MOMENTS = ("exp_avg", "graft_v", "momentum_buffer")
"""The parameter-shaped moments (float32, or float64 for float64 parameters)."""


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Statistics and moments are float32, or float64 for float64 parameters."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def stored_dtype(param: torch.Tensor, config: EngineConfig | None) -> torch.dtype:
    """The dtype roots (bases) and moments are kept in: the group's ``state_dtype`` (bfloat16:
    computed in float32, :mod:`.rounding`), else :func:`state_dtype`. Factors stay in
    :func:`state_dtype`: bfloat16's 8 bits lose a factor's eigenvalues below ~2⁻⁸ of its largest,
    which the roots of ill-conditioned factors depend on (docs/design.md, "Low-precision state")."""
    low = None if config is None else config.state_dtype
    return state_dtype(param) if low is None else low


def _factor_sizes(layout: BlockLayout) -> list[int]:
    return [d for b in range(layout.num_blocks) for d in layout.factor_dims(b)]


def init_state(
    p: torch.Tensor, state: dict[str, Any], layout: BlockLayout, dtype: torch.dtype | None = None
) -> None:
    """The state of a parameter at its first step: factors in :func:`state_dtype`, roots in
    ``dtype`` (None: the same; see :func:`stored_dtype`)."""
    dtype = dtype or state_dtype(p)
    sizes = _factor_sizes(layout)
    state["step"] = torch.tensor(0.0)
    # One zero factor and identity root per size, shared by the blocks until the bucket plan
    # copies them into its stacks: the first step's peak holds no per-block matrices twice.
    zeros = {d: torch.zeros(d, d, dtype=state_dtype(p), device=p.device) for d in set(sizes)}
    eyes = {d: torch.eye(d, dtype=dtype, device=p.device) for d in set(sizes)}
    state["factors"] = [zeros[d] for d in sizes]
    state["roots"] = [eyes[d] for d in sizes]
    state["root_failures"] = torch.zeros(len(sizes), dtype=torch.int64)
    state["has_root"] = torch.zeros(len(sizes), dtype=torch.bool)
    state["skipped_blocks"] = torch.zeros((), dtype=torch.int64, device=p.device)
    no_pending(state)


def keep_bases(state: dict[str, Any], config: EngineConfig) -> bool:
    """Give ``state`` the eigenbases warm-started roots keep (``config.warm_roots``): identities
    until a factor's first exact root; returns whether they were added (the plan is stale)."""
    if not config.warm_roots or "bases" in state or "roots" not in state:
        return False
    state["bases"] = [torch.eye(len(r), dtype=r.dtype, device=r.device) for r in state["roots"]]
    return True


SCHEMA = 2
"""The version of the saved state's layout (see :mod:`torch_shampoo.checkpoint`)."""


def no_pending(state: dict[str, Any]) -> None:
    """The pending-root slots with their "none" marker (``pending_due`` = -1)."""
    state["schema"] = torch.tensor(SCHEMA)
    state["pending_due"] = torch.tensor(-1)
    state["pending_submitted"] = torch.tensor(-1)
    state["pending_ok"] = torch.zeros(len(state["factors"]), dtype=torch.bool)
    state["pending_roots"] = {}
    state.pop("pending_reasons", None)


def in_flight(state: dict[str, Any]) -> bool:
    """Does ``state`` hold roots in flight (loaded or exported)?"""
    return "pending_due" in state and int(state["pending_due"]) >= 0


def check_state(
    owner: str, name: str, p: torch.Tensor, state: dict[str, Any], layout: BlockLayout
) -> None:
    """Refuse state that does not fit the parameter's layout instead of misusing it."""
    missing = {"step", "factors", "roots", "root_failures", "skipped_blocks"} - set(state)
    if missing:
        raise ValueError(
            f"{owner} state of parameter {name} lacks {sorted(missing)}: the state dict is "
            f"truncated or not from this optimizer"
        )
    expected = _factor_sizes(layout)
    found = [f.shape[0] for f in state["factors"]]
    if (
        found != expected
        or [tuple(r.shape) for r in state["roots"]] != [(d, d) for d in expected]
        or any(tuple(f.shape) != (d, d) for f, d in zip(state["factors"], expected))
        or any(state[k].shape != p.shape for k in MOMENTS if k in state)
        or any(tuple(q.shape) != (d, d) for q, d in zip(state.get("bases", []), expected))
        or len(state.get("bases", expected)) != len(expected)
        or len(state["root_failures"]) != len(expected)
        or ("has_root" in state and len(state["has_root"]) != len(expected))
        or not _pending_fits(state, expected)
    ):
        raise ValueError(
            f"{owner} state of parameter {name} does not match its block layout "
            f"(factor sizes {found}, expected {expected}): was the state loaded from another "
            f"model, or did the parameter's shape or block_size / max_factor_dim / merge_dims "
            f"change after training started? (merge_dims=True keeps two dims of a small tensor "
            f"that merge_dims='all' merged into one)"
        )


def moments_used(config: EngineConfig) -> dict[str, bool]:
    """Per moment, does the group use it (with β₁ = 0 the first moment is the gradient)?"""
    return {
        "exp_avg": config.beta1 != 0,
        "momentum_buffer": config.momentum != 0,
        "graft_v": config.grafting in SECOND_MOMENT,
    }


def check_moments(owner: str, name: str, state: dict[str, Any], config: EngineConfig) -> None:
    """Loaded state of a parameter that has stepped must hold the moments its group uses."""
    used = moments_used(config) if float(state["step"]) > 0 else {}
    missing = [key for key in MOMENTS if used.get(key) and key not in state]
    if missing:
        raise ValueError(
            f"{owner} state of parameter {name} lacks {missing}, which its group's settings "
            f"use: the state dict is truncated or from another configuration"
        )


def _pending_fits(state: dict[str, Any], sizes: list[int]) -> bool:
    """Do the saved in-flight roots (if any) match the factor sizes?"""
    if not in_flight(state):
        return True
    roots, ok = state.get("pending_roots", []), state.get("pending_ok", [])
    reasons = state.get("pending_reasons", [])
    if "pending_submitted" not in state or not len(roots) == len(ok) == len(reasons) == len(sizes):
        return False
    return all(not bool(k) or tuple(r.shape) == (d, d) for r, k, d in zip(roots, ok, sizes))


def migrate(state: dict[str, Any]) -> None:
    """Bring a state saved by an earlier release up to date: ``has_root`` (absent before) is
    read off the roots, an identity root counting as none; the pending slots are added."""
    if "roots" in state and "pending_due" not in state:
        no_pending(state)
    if "roots" in state and "has_root" not in state:
        roots = state["roots"]
        eye = [torch.equal(r, torch.eye(len(r), dtype=r.dtype, device=r.device)) for r in roots]
        state["has_root"] = torch.tensor([not e for e in eye], dtype=torch.bool).reshape(-1)


def recast(state: dict[str, Any], param: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Cast the floating-point entries of ``state`` to ``dtype`` (None: ``param``'s state dtype;
    factors: always that) where they differ (the model's dtype or ``state_dtype`` changed, or a
    checkpoint of another ``state_dtype`` was loaded): to bfloat16 by :func:`.rounding.narrow`
    (seeded by the step)."""
    seed = rounding.seed_of(int(state.get("step", 0)), "load")
    for key, value in state.items():
        if key in HOST_KEYS or not isinstance(value, (torch.Tensor, list)):
            continue
        if dtype is None or dtype not in rounding.LOW or key == "factors":
            state[key] = restore(key, value, param, copy=False)
        else:
            state[key] = _narrowed(value, param, dtype, seed)


def _narrowed(value: Any, param: torch.Tensor, dtype: torch.dtype, seed: int) -> Any:
    if isinstance(value, list):
        return [_narrowed(v, param, dtype, seed + i) for i, v in enumerate(value)]
    value = value.to(param.device)
    if not value.is_floating_point() or value.dtype == dtype:
        return value
    return rounding.narrow(value, dtype, seed)


def restore(key: str, value: Any, param: torch.Tensor, copy: bool = True) -> Any:
    """A saved state entry (a fresh object unless not ``copy``): host entries on the CPU in their
    dtype, the others on ``param``'s device, floating-point ones in its state dtype."""
    if isinstance(value, torch.Tensor):
        if key in HOST_KEYS:
            return value.to("cpu", copy=copy)
        dtype = state_dtype(param) if value.is_floating_point() else value.dtype
        return value.to(param.device, dtype, copy=copy)
    if isinstance(value, list):
        return [restore(key, v, param, copy) for v in value]
    return value

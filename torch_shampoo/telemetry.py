"""Plain numbers about an optimizer's roots and memory: what ``root_stats()`` returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["held_bytes", "root_stats"]


def root_stats(
    stats: Any,
    staleness: list[int | None],
    pending: int,
    states: Mapping[torch.Tensor, Any],
    host: list[torch.Tensor],
    names: Mapping[tuple[int, int], str],
) -> dict[str, Any]:
    """What ``root_stats()`` returns: plain numbers about the inverse roots since the optimizer
    object was created (``names``: each factor's by (parameter index, factor)).

    ``roots_computed`` / ``root_failures``: roots installed / rejected (non-finite or failed
    solves; the previous root stays). ``roots_solved_here``: those this process solved itself
    (with ``partition_roots``, its share; roots loaded from a checkpoint: none). ``stalls`` /
    ``stall_seconds``: steps that waited for a late root of a later cycle, and how long.
    ``first_root_seconds``: time spent waiting for first root cycles, which are installed in the
    step that computes them. ``root_staleness``: the staleness each group's later cycles use (an
    ``"auto"`` group's fitted value; ``None`` until it is fitted; one int when all groups agree).
    ``staleness_increases``: times an auto staleness grew after a stall. ``mean_staleness`` /
    ``max_staleness``: age in steps of the installed roots. ``mean_root_seconds``: solver time per
    root. ``pending_parameters``: parameters with roots in flight. ``skipped_blocks``: blocks
    skipped for non-finite gradients. ``state_bytes`` / ``host_buffer_bytes``: bytes of the
    optimizer state and of the host buffers (``host``) held for roots that run off the step;
    ``state_bytes_per_element``: state bytes per parameter element (Adam's float32 moments: 8).
    ``last_error``: per factor, the solver's own accuracy estimate for its last root, not a
    failure: 0.0 for the direct methods (eigh, cholesky), the residual for newton.
    ``root_retries``: roots solved here whose float32 solve failed (``root_dtype=torch.float32``:
    not finite, or too ill-conditioned for float32) and that were solved again in float64.
    """
    installed = stats.roots_computed + stats.root_failures
    state = held_bytes(states)
    skipped = [s.get("skipped_blocks", 0) for s in states.values() if isinstance(s, dict)]
    return {
        "roots_computed": stats.roots_computed,
        "roots_solved_here": stats.roots_solved,
        "root_failures": stats.root_failures,
        "root_retries": stats.root_retries,
        "stalls": stats.stalls,
        "stall_seconds": stats.stall_seconds,
        "first_root_seconds": stats.first_root_seconds,
        "root_staleness": staleness[0] if len(set(staleness)) == 1 else staleness,
        "staleness_increases": stats.staleness_increases,
        "mean_staleness": stats.staleness_total / max(1, stats.staleness_count),
        "max_staleness": stats.staleness_max,
        "mean_root_seconds": stats.root_seconds / max(1, installed),
        "pending_parameters": pending,
        "skipped_blocks": sum(int(count) for count in skipped),
        "state_bytes": state,
        "host_buffer_bytes": held_bytes(host),
        "state_bytes_per_element": state / max(1, sum(p.numel() for p in states)),
        "last_error": {names[k]: e for k, e in stats.last_error.items() if k in names},
    }


def held_bytes(value: Any) -> int:
    """Bytes of the memory the tensors in ``value`` (nested lists, tuples and dicts) hold: each
    storage once, however many views of it there are (per-block views of a bucket's stacks)."""
    storages: dict[tuple[int, str], int] = {}
    alone = 0

    def visit(v: Any) -> None:
        nonlocal alone
        if isinstance(v, torch.Tensor):
            try:
                storage = v.untyped_storage()
            except (RuntimeError, NotImplementedError, TypeError):  # no storage of its own
                alone += v.nbytes
                return
            storages[storage.data_ptr(), str(v.device)] = storage.nbytes()
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    visit(list(value) if not isinstance(value, (torch.Tensor, dict, list, tuple)) else value)
    return sum(storages.values()) + alone

"""Plain numbers about an optimizer's roots and memory: what ``root_stats()`` returns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .engine import PreconditionerEngine

__all__ = ["held_bytes", "memory", "nbytes", "root_stats"]


def root_stats(engine: PreconditionerEngine) -> dict[str, Any]:
    """The numbers documented in :meth:`PreconditionerEngine.root_stats`."""
    stats = engine._roots.stats
    installed = stats.roots_computed + stats.root_failures
    params = engine._all_params()
    staleness = [engine._resolved_staleness(group) for group in engine.param_groups]
    return {
        "roots_computed": stats.roots_computed,
        "roots_solved_here": stats.roots_solved,
        "root_failures": stats.root_failures,
        "stalls": stats.stalls,
        "stall_seconds": stats.stall_seconds,
        "first_root_seconds": stats.first_root_seconds,
        "root_staleness": staleness[0] if len(set(staleness)) == 1 else staleness,
        "staleness_increases": stats.staleness_increases,
        "mean_staleness": stats.staleness_total / max(1, stats.staleness_count),
        "max_staleness": stats.staleness_max,
        "mean_root_seconds": stats.root_seconds / max(1, installed),
        "pending_parameters": len(engine._roots.pending),
        "skipped_blocks": int(
            sum(
                int(s["skipped_blocks"])
                for s in engine.state.values()
                if isinstance(s, dict) and "skipped_blocks" in s
            )
        ),
        **memory(engine),
        "last_error": {
            engine._factor_name(params[i], j): error
            for (i, j), error in stats.last_error.items()
            if i < len(params)
        },
    }


def memory(engine: PreconditionerEngine) -> dict[str, float]:
    """Bytes of the optimizer state, of the host buffers of roots in flight, and the state's
    bytes per parameter element (Adam's float32 moments: 8)."""
    state = held_bytes(engine.state.values())
    host = sum(
        b.snapshot.nbytes + b.result.nbytes
        for buffers in engine._roots.staging.values()
        for b in buffers
    )
    elements = sum(p.numel() for p in engine.state)
    return {
        "state_bytes": state,
        "host_buffer_bytes": host,
        "state_bytes_per_element": state / max(1, elements),
    }


def held_bytes(value: Any) -> int:
    """Bytes of the memory that the tensors in ``value`` (nested lists, tuples and dicts) hold:
    each storage once, however many views of it there are (the state's per-block views of a
    bucket's stacks; compact state's two views of one stack)."""
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


def nbytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0

"""A plan of what an optimizer will hold and compute, made from settings and shapes alone.

:func:`make` reads each parameter's group config and block layout, nothing else: per parameter
its layout, bucket, state bytes by kind and root work per cycle; in total the ratio to Adam's
state and the staleness that root work implies at a step time. It makes no state, bucket,
thread or random number; its one effect is a timing of float64 ``eigh`` per factor size, once
per process (:func:`~torch_shampoo.roots.costs.eigh_seconds`). What a user reads before a long
run, to pick ``block_size`` and ``precondition_frequency``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .config import EngineConfig, world_size
from .layout.blocking import BlockLayout
from .layout.buckets import bucket_key
from .layout.compact import pairs
from .plan_report import KINDS, BucketRow, Plan, Row
from .roots import costs, phases
from .roots.costs import EIGH_FLOPS, NEWTON_ITERATIONS
from .roots.staleness import StalenessFit
from .state import init_state, keep_bases, moments_used, state_dtype, stored_dtype

if TYPE_CHECKING:
    from .roots.scheduler import RootScheduler

__all__ = ["KINDS", "Entry", "Plan", "entries_of", "make", "of_engine"]

_KIND_OF = {"factors": "factors", "roots": "roots", "graft_v": "graft", "exp_avg": "moments",
            "momentum_buffer": "moments"}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One parameter as the optimizer sees it before a step."""

    index: int
    name: str
    p: torch.Tensor
    group: int
    config: EngineConfig
    layout: BlockLayout
    leader: int | None = None
    """The parameter whose roots this one uses (NG+: a hooked layer's bias), by index."""


def entries_of(
    groups: list[dict[str, Any]],
    config_of: Callable[[dict[str, Any]], EngineConfig],
    layout_of: Callable[[torch.Tensor, EngineConfig], BlockLayout],
    leader_of: Callable[[torch.Tensor], torch.Tensor | None],
    names: Mapping[torch.Tensor, str] | None = None,
) -> list[Entry]:
    """The parameters of ``groups`` that require a gradient, named by ``names``, else by the
    group's ``param_names``, else by their index over all groups."""
    params = [p for group in groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    entries = []
    for g, group in enumerate(groups):
        config = config_of(group)
        given = group.get("param_names") or [None] * len(group["params"])
        for p, name in zip(group["params"], given):
            if not p.requires_grad:
                continue
            i, leader = index[id(p)], leader_of(p)
            name = (names or {}).get(p) or name or str(i)
            lead = None if leader is None else index[id(leader)]
            entries.append(Entry(i, name, p, g, config, layout_of(p, config), lead))
    return entries


def make(
    owner: str,
    entries: list[Entry],
    configs: list[EngineConfig],
    *,
    compact: bool | str,
    async_roots: bool,
    workers: int,
    threads: int,
    step_seconds: float | None = None,
    measured: float | None = None,
) -> Plan:
    """The plan of ``entries`` (``configs``: every group's); ``step_seconds`` (else ``measured``,
    the optimizer's median step) sets the staleness estimate."""
    if step_seconds is not None and (
        isinstance(step_seconds, bool)
        or not isinstance(step_seconds, (int, float))
        or not 0 < step_seconds < math.inf
    ):
        raise ValueError(f"Invalid step_seconds: {step_seconds!r} (must be a positive number)")
    rooted = [e for e in entries if e.leader is None]
    timed = costs.eigh_seconds({d for e in rooted for d in _sizes(e.layout)}, threads)
    keys: dict[tuple[Any, ...], int] = {}
    buckets: list[BucketRow] = []
    rows = []
    for e in entries:
        ids = []
        shapes = e.layout.block_shapes if e.p.numel() else ()  # (as plan_buckets: none if empty)
        for shape in dict.fromkeys(shapes):  # in order of first appearance, as plan_buckets
            key = bucket_key(e.group, shape, e.layout, e.p)
            if key not in keys:
                keys[key] = len(buckets)
                dtype = str(e.p.dtype).removeprefix("torch.")
                buckets.append(BucketRow(len(buckets), shape, e.layout.factored, dtype))
            buckets[keys[key]].blocks += shapes.count(shape)
            ids.append(keys[key])
        rows.append(_row(e, ids, timed, compact, async_roots))
    step, source = (step_seconds, "given") if step_seconds is not None else (measured, "measured")
    methods = list(dict.fromkeys(_method(e.config) for e in rooted if _sizes(e.layout)))
    frequencies = [c.frequency for c in configs]
    packs = compact is True or (bool(compact) and any(_paired(e) for e in entries))
    plan = Plan(owner, rows, buckets, workers, threads, async_roots, packs, frequencies, [],
                float(step) if step else None, source if step else "none", methods)  # fmt: skip
    plan.busiest = _busiest(rooted, configs, async_roots)
    plan.staleness = [_staleness(c, async_roots, plan.cycle_seconds * plan.busiest,
                                 plan.step_seconds) for c in configs]  # fmt: skip
    return plan


def _busiest(rooted: list[Entry], configs: list[EngineConfig], async_roots: bool) -> float:
    """The busiest root step's share of a cycle's root work: each staggered group's busiest
    phase (:func:`.roots.phases.balance`), every other group's whole work, over the total."""
    busiest = total = 0.0
    for g, config in enumerate(configs):
        work = [phases.cost(e.layout) for e in rooted if e.group == g]
        total += sum(work)
        if not phases.staggered(config.stagger_roots, async_roots, world_size()):
            busiest += sum(work)
            continue
        busiest += max(phases.loads(work, config.frequency))
    return busiest / total if total else 1.0


def of_engine(
    owner: str,
    groups: list[dict[str, Any]],
    config_of: Callable[[dict[str, Any]], EngineConfig],
    layout_of: Callable[[torch.Tensor, EngineConfig], BlockLayout],
    leader_of: Callable[[torch.Tensor], torch.Tensor | None],
    roots: RootScheduler,
    compact: bool | str,
    step_seconds: float | None,
    model: torch.nn.Module | None,
) -> Plan:
    """The plan of an engine's parameters (``model``: their names) with its root scheduler."""
    names: dict[torch.Tensor, str] | None = None
    if model is not None:
        names = {p: n for n, p in model.named_parameters()}
    entries = entries_of(groups, config_of, layout_of, leader_of, names)
    return make(owner, entries, [config_of(g) for g in groups], compact=compact,
                async_roots=roots.async_roots, workers=roots.workers, threads=roots.threads(),
                step_seconds=step_seconds, measured=roots.fit.step_seconds())  # fmt: skip


def _paired(e: Entry) -> bool:
    """Does compact state pair the dims of any block of ``e`` (:func:`.layout.compact.pairs`)?"""
    dtype = stored_dtype(e.p, e.config)
    blocks = range(e.layout.num_blocks) if e.p.numel() else ()
    warm = e.config.warm_roots
    return any(pairs(e.layout.factor_dims(b), state_dtype(e.p), dtype, warm) for b in blocks)


def _sizes(layout: BlockLayout) -> list[int]:
    return [d for b in range(layout.num_blocks) for d in layout.factor_dims(b)]


def _row(
    e: Entry, buckets: list[int], timed: Mapping[int, float], compact: bool | str,
    async_roots: bool,
) -> Row:
    layout, config, p = e.layout, e.config, e.p
    sizes = _sizes(layout)
    amounts = _state_bytes(p, layout, config, compact)
    # host buffers: later roots used s > 0 steps late (auto: async), or any root on CUDA
    late = config.staleness if config.staleness is not None else int(async_roots)
    staged = e.leader is None and (p.is_cuda or late > 0)
    amounts["staging"] = 2 * sum(d * d for d in sizes) * state_dtype(p).itemsize if staged else 0
    exponent = config.root_exponent or 2.0 * sum(layout.factored)
    bases = config.eigenbasis or config.warm_roots  # (the pool computes eigenvectors alone)
    flops = (
        [costs.root_flops(d, config.root_method, exponent, bases) for d in sizes]
        if e.leader is None
        else []
    )
    seconds = sum(timed[d] * f / (EIGH_FLOPS * d**3) for d, f in zip(sizes, flops))
    one_sided = [d for d, f in zip(layout.shape, layout.factored) if not f]
    return Row(e.index, e.name, tuple(p.shape), p.numel(), _layout_text(layout),
               layout.num_blocks, sizes, one_sided, buckets, amounts, sum(flops), seconds,
               e.leader, p.element_size())  # fmt: skip


def _state_bytes(
    p: torch.Tensor, layout: BlockLayout, config: EngineConfig, compact: bool | str
) -> dict[str, int]:
    """Bytes by kind of the state the first step makes: ``init_state`` on a meta tensor (no
    memory) and the moments the group uses, as ``Ledger.state_of`` adds them."""
    state: dict[str, Any] = {}
    dtype = stored_dtype(p, config)
    init_state(torch.empty(p.shape, dtype=p.dtype, device="meta"), state, layout, dtype)
    for key, used in moments_used(config).items():
        if used:
            state[key] = torch.empty(p.shape, dtype=dtype, device="meta")
    keep_bases(state, config)
    amounts = dict.fromkeys(KINDS, 0)
    for key, value in state.items():
        amounts[_KIND_OF.get(key, "other")] += _nbytes(value)
    if compact:  # a triangle each of (d + 1, d) tensors, roots in theirs when paired
        factor_dtype, amounts["factors"], amounts["roots"] = state_dtype(p), 0, 0
        for b in range(layout.num_blocks):
            sizes = layout.factor_dims(b)
            paired = pairs(sizes, factor_dtype, dtype, config.warm_roots)
            if compact is True or paired:  # ("auto": the paired alone)
                half = sum(d * (d + 1) // 2 for d in sizes)
                amounts["factors"] += half * factor_dtype.itemsize
                amounts["roots"] += half * (dtype if paired else factor_dtype).itemsize
            else:
                amounts["factors"] += sum(d * d for d in sizes) * factor_dtype.itemsize
                amounts["roots"] += sum(d * d for d in sizes) * dtype.itemsize
    return amounts


def _staleness(
    config: EngineConfig, async_roots: bool, cycle: float, step: float | None
) -> int | None:
    """A group's later roots' staleness: set, 0 (sync), else as ``StalenessFit`` fits it."""
    if config.staleness is not None:
        return config.staleness
    if not async_roots:
        return 0
    if world_size() > 1 or torch.are_deterministic_algorithms_enabled():
        return config.frequency
    if not step:
        return None
    return min(config.frequency, max(1, math.ceil(StalenessFit.MARGIN * cycle / step)))


def _method(config: EngineConfig) -> str:
    if config.eigenbasis or config.warm_roots:
        every = config.eigh_every
        return "eigenbases: eigh 9d³" + (f", every {every} root steps" if every > 1 else "")
    if config.root_method == "cholesky":
        return "Cholesky inverse d³"
    if config.root_method == "newton":
        return f"coupled Newton, {NEWTON_ITERATIONS} iterations assumed"
    return "eigh root: eigh 9d³ + W Wᵀ 2d³"


def _layout_text(layout: BlockLayout) -> str:
    parts = []
    for d, factored, chunks in zip(layout.shape, layout.factored, layout.grid):
        if not factored:
            parts.append(f"[{d}]")
            continue
        full, last = chunks[0], chunks[-1]
        n = len(chunks) - (last != full)
        cut = (f"{n}×{full}" if n > 1 else str(full)) + (f"+{last}" if last != full else "")
        parts.append(str(d) if len(chunks) == 1 else f"{d}={cut}")
    return " × ".join(parts)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0

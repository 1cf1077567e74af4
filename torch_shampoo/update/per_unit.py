"""The elementwise half of a step, on *units*: one parameter, or a whole bucket of single-block
parameters whose moments live stacked. The functions are the numbered lines of
:class:`torch_shampoo.Shampoo`'s docstring, written once for both kinds: every operation is
elementwise or broadcasts a per-block flag, so a stacked unit computes bitwise what its
parameters would one at a time."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import device, rounding
from ..config import EngineConfig
from ..layout.blocking import BlockLayout, expand_grid
from ..layout.buckets import Bucket
from ..state import state_dtype
from . import kernels
from .grafting import graft_direction, update_graft_state

__all__ = [
    "Unit",
    "Widened",
    "Work",
    "curvature",
    "directions",
    "gradient",
    "learning_rate",
    "mark_finite",
    "narrow",
    "rows_of",
    "step_scalars",
    "units_of",
    "update_moments",
    "update_parameters",
    "widen",
]


@dataclass
class Work:
    """One parameter's share of a step: set up by the eager bookkeeping, used by the math."""

    p: torch.Tensor
    """The parameter: the key of its state, buckets and roots."""
    state: dict[str, Any]
    config: EngineConfig
    layout: BlockLayout
    t: int
    group: dict[str, Any]
    rooted: tuple[bool, ...] | None
    """Per block: are all its roots installed? (None: every block's are.)"""
    curvature: torch.Tensor | None
    """Statistics prepared outside the step (NG+'s per-sample Ĝ); None: G Gᵀ."""
    param: torch.Tensor
    """The tensor the math reads (with its ``.grad``) and writes: ``p``, or for a DTensor
    parameter the gathered whole (:mod:`torch_shampoo.distributed.dtensor`)."""
    bias: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    """1 − β₁ᵗ and the graft's 1 − β₂ᵗ as 0-d tensors (:func:`step_scalars`); None: uncorrected."""
    lr: torch.Tensor | None = None
    """A float lr as a 0-d tensor (:func:`step_scalars`), for the traced update."""


@dataclass
class Unit:
    """One parameter, or (``bucket`` set) the stacked parameters of a whole bucket."""

    works: list[Work]
    state: dict[str, torch.Tensor]
    """exp_avg, graft_v, momentum_buffer, skipped_blocks: the parameter's, or the stacks."""
    bucket: Bucket | None = None
    g: torch.Tensor | None = None
    cells: torch.Tensor | None = None
    """Per block, is this step's gradient finite? The parameter's grid of flags (0-d for one
    block), or (n,) for a stack; None when the guard is off."""
    finite: bool = False
    """This step's gradients are known to be finite (:func:`mark_finite`): no guard needed."""
    m_hat: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    """The graft's direction (None without a graft)."""
    stored: dict[str, torch.Tensor] | None = None
    """bfloat16 state (:func:`widen`): ``state`` as stored, while ``state`` holds float32 copies."""
    widened: Widened | None = None

    @property
    def config(self) -> EngineConfig:
        return self.works[0].config

    def keep(self) -> torch.Tensor | None:
        """The flags as a mask broadcastable to the unit's tensors, built where it is used."""
        cells = self.cells
        if cells is None:
            return None
        if self.bucket is not None:
            return cells.view(-1, *(1,) * len(self.bucket.block_shape))
        layout = self.works[0].layout
        return cells if layout.num_blocks == 1 else expand_grid(cells, layout)

    def params(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The parameter, or the stack of the bucket's parameters (a copy), in ``dtype``."""
        if self.bucket is None:
            p = self.works[0].param.detach()
        else:
            p = torch.stack([w.param.detach().reshape(self.bucket.block_shape) for w in self.works])
        return p if dtype is None else p.to(dtype)

    def step_direction(self, preconditioned: torch.Tensor | None) -> torch.Tensor:
        """Shampoo's direction where given, else the graft's (m̂ without a graft)."""
        if preconditioned is not None:
            return preconditioned
        assert self.m_hat is not None
        return self.m_hat if self.direction is None else self.direction


def step_scalars(work: Sequence[Work]) -> None:
    """Set each work's ``bias`` and, for a float lr, its ``lr`` as host 0-d tensors of its state
    dtype (which round as the floats do), one per value and dtype: inductor specializes the
    floats that traced code reads, so one changing per step would recompile every step."""

    @functools.cache
    def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(value, dtype=dtype)

    for w in work:
        config, dtype = w.config, state_dtype(w.p)
        if config.bias_correction:
            beta1_t, beta2_t = config.beta1**w.t, config.grafting_beta2**w.t
            w.bias = (scalar(1.0 - beta1_t, dtype), scalar(1.0 - beta2_t, dtype))
        if not isinstance(config.lr, torch.Tensor):
            w.lr = scalar(config.lr, dtype)


def learning_rate(u: Unit) -> float | torch.Tensor:
    """The lr of ``u``'s update: the group's, or under ``torch.compile`` a float one as the
    0-d tensor the bookkeeping made (so that a scheduler's new lr compiles nothing new)."""
    if torch.compiler.is_compiling() and u.works[0].lr is not None:
        return u.works[0].lr
    return u.config.lr


def gradient(u: Unit) -> torch.Tensor:
    """This step's gradient in the state dtype (p.grad itself where nothing writes to it: p.grad
    is never modified), with the non-finite guard: blocks whose gradient is not finite are
    zeroed and flagged in ``u.cells``, which then mask every state update (no host sync). Flags
    known to be all True (on the CPU) leave ``u.cells`` None: masking would change nothing."""
    config, dtype = u.config, state_dtype(u.works[0].p)
    coupled = config.weight_decay != 0 and not config.decoupled_weight_decay
    guard = config.skip_nonfinite and not u.finite
    writes = config.maximize or coupled or guard  # else only read: no copy
    if u.bucket is None:
        grad = u.works[0].param.grad
        assert grad is not None
        g = grad.to(dtype=dtype, memory_format=torch.contiguous_format, copy=writes).contiguous()
    else:
        shape = u.bucket.block_shape
        grads = [w.param.grad.reshape(shape) for w in u.works]  # type: ignore[union-attr]
        if len(grads) == 1 and not writes:
            g = grads[0].unsqueeze(0).to(dtype).contiguous()  # (to() keeps a view's strides)
        else:
            g = torch.stack(grads).to(dtype).contiguous()  # a strided gradient's may not be
    if config.maximize:
        g.neg_()
    if coupled:
        g.add_(u.params(g.dtype), alpha=config.weight_decay)
    if guard:
        if u.bucket is None:
            cells, bad = kernels.finite_blocks(g, u.works[0].layout)
        else:
            cells = torch.isfinite(g.flatten(1).sum(1, dtype=torch.float64))
            bad = cells.logical_not()
        u.state["skipped_blocks"] += bad
        if not device.known_all_true(cells):  # else the unguarded path is the same, bitwise
            u.cells = cells
            keep = u.keep()
            assert keep is not None
            g.masked_fill_(keep.logical_not(), 0.0)
    return g


def curvature(u: Unit) -> None:
    """F ← β₂F + Ĝ per factor, for a parameter with statistics prepared outside the step (NG+'s)."""
    w = u.works[0]
    if u.bucket is None and w.curvature is not None:
        kernels.curvature_statistics(
            w.state["factors"], w.curvature, w.layout, u.config.beta2, u.cells
        )


_MOMENTS = ("exp_avg", "graft_v", "momentum_buffer")


@dataclass
class Widened:
    """Moments stored in bfloat16, as float32 views of one flat buffer until :func:`narrow`."""

    flat: torch.Tensor
    stored: list[torch.Tensor]
    seed: int


def widen(units: Sequence[Unit]) -> None:
    """Where a unit's group keeps bfloat16 state, :func:`_widen` (eager: its seed and buffers
    change at every step, which a compiled step would recompile for); else nothing."""
    if any(u.config.state_dtype is not None for u in units):
        _widen(units)


def narrow(units: Sequence[Unit]) -> None:
    """:func:`_narrow` where :func:`widen` widened (eager)."""
    if any(u.config.state_dtype is not None for u in units):
        _narrow(units)


@torch.compiler.disable
def _widen(units: Sequence[Unit]) -> None:
    """The units' moments stored in bfloat16 as copies in their state dtype (float32; float64 for
    float64 parameters) in their ``state`` (views of one buffer per device and dtype: one cast
    in, one rounding out) until :func:`narrow`."""
    found: dict[tuple[torch.device, torch.dtype], list[tuple[Unit, str]]] = {}
    for u in units:
        dtype = state_dtype(u.works[0].p)
        low = [k for k in _MOMENTS if k in u.state and u.state[k].dtype != dtype]
        if u.stored is None and low:
            u.stored, u.state = u.state, dict(u.state)
            found.setdefault((u.works[0].p.device, dtype), []).extend((u, k) for k in low)
    for (_, dtype), pairs in found.items():
        stored = [u.state[k] for u, k in pairs]
        flat = torch.empty(sum(x.numel() for x in stored), dtype=dtype, device=stored[0].device)
        parts = [p.view(x.shape) for p, x in zip(flat.split([x.numel() for x in stored]), stored)]
        torch._foreach_copy_(parts, stored)  # (no bfloat16 concatenation on the way)
        seed = rounding.seed_of(pairs[0][0].works[0].t, "moments")
        widened = Widened(flat, stored, seed)
        for (u, key), part in zip(pairs, parts):
            u.state[key], u.widened = part, widened


@torch.compiler.disable
def _narrow(units: Sequence[Unit]) -> None:
    """The float32 moments of :func:`widen` written back, stochastically rounded (seeded by the
    first unit's step: :mod:`torch_shampoo.rounding`)."""
    done: set[int] = set()
    for u in units:
        widened = u.widened
        if widened is not None and id(widened) not in done:
            done.add(id(widened))
            flat = widened.flat.float()  # (float64 parameters' moments: to nearest first)
            rounding.round_(flat, widened.seed)  # (in place: bfloat16's values)
            parts = flat.split([x.numel() for x in widened.stored])
            shaped = [p.view(x.shape) for p, x in zip(parts, widened.stored)]
            torch._foreach_copy_(widened.stored, shaped)  # (exact casts)
        if u.stored is not None:
            u.state, u.stored, u.widened = u.stored, None, None


def update_moments(u: Unit) -> None:
    """The first moment and the graft's second moment from ``u.g`` (masked by the guard)."""
    state, config, keep, g = u.state, u.config, u.keep(), u.g
    assert g is not None
    exp_avg = state.get("exp_avg")
    if exp_avg is None:  # β₁ = 0: m̂ is the gradient itself
        u.m_hat = g
    elif keep is None:
        exp_avg.lerp_(g, 1.0 - config.beta1)
    else:
        torch.where(keep, exp_avg.lerp(g, 1.0 - config.beta1), exp_avg, out=exp_avg)
    update_graft_state(config.grafting, state, g, config.grafting_beta2, keep)


def directions(u: Unit) -> None:
    """3. The bias-corrected first moment m̂ and 5. the graft's direction."""
    config, (bias1, bias2) = u.config, u.works[0].bias
    if u.m_hat is None:
        exp_avg = u.state["exp_avg"]
        u.m_hat = exp_avg if bias1 is None else exp_avg / bias1
    u.direction = graft_direction(
        config.grafting, u.state, u.m_hat, epsilon=config.grafting_epsilon, correction=bias2
    )


def update_parameters(u: Unit, preconditioned: torch.Tensor | None) -> None:
    """6. Decoupled weight decay, 7. momentum and 8. the parameter update from this step's
    direction: Shampoo's (``preconditioned``), else the graft's (m̂ without one)."""
    state, config, keep = u.state, u.config, u.keep()
    update = u.step_direction(preconditioned)
    if config.weight_decay != 0 and config.decoupled_weight_decay:
        update = update + config.weight_decay * u.params(update.dtype)
    mu = config.momentum
    if mu != 0:
        buffer = state["momentum_buffer"]
        if keep is None:
            buffer.mul_(mu).add_(update)
        else:
            torch.where(keep, buffer * mu + update, buffer, out=buffer)
        update = update + mu * buffer if config.nesterov else buffer
    lr, params = learning_rate(u), [w.param for w in u.works]
    step = (update * lr if isinstance(lr, torch.Tensor) else update).to(params[0].dtype)
    alpha = -1.0 if isinstance(lr, torch.Tensor) else -lr
    if keep is not None:
        p = u.params()
        moved = p.add(step, alpha=alpha)
        if u.bucket is None:
            torch.where(keep, moved, p, out=params[0])
            return
        torch._foreach_copy_(params, rows_of(torch.where(keep, moved, p), params))
    elif u.bucket is None:
        params[0].add_(step, alpha=alpha)
    else:
        torch._foreach_add_(params, rows_of(step, params), alpha=alpha)


def rows_of(stack: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The rows of a stacked unit's tensor, each viewed in its parameter's shape."""
    return [row.view(p.shape) for row, p in zip(stack.unbind(), params)]


def mark_finite(units: list[Unit]) -> None:
    """On the CPU, one norm per guarded gradient: when all are finite, the units skip the
    per-block guard, whose flags would all be True (an overflowing norm only costs that guard).
    Not on CUDA (reading the answer waits for the stream) nor under torch.compile."""
    grads = [w.param.grad for u in units if u.config.skip_nonfinite for w in u.works]
    if not grads or torch.compiler.is_compiling():
        return
    if any(g is None or g.device.type != "cpu" or g.is_sparse for g in grads):
        return
    if all(math.isfinite(n.item()) for n in torch._foreach_norm(grads)):  # type: ignore[arg-type]
        for u in units:
            u.finite = True


def units_of(work: list[Work], buckets: list[Bucket]) -> tuple[list[Unit], dict[int, Unit]]:
    """The step's units: a bucket with stacked moments whose parameters all step now, at one
    step count, is one; every other parameter is its own. Also the stacked ones by ``id``."""
    by_param = {w.p: w for w in work}
    stacked: dict[int, Unit] = {}
    for bucket in buckets:
        if not bucket.moments:
            continue
        found = [by_param.get(m.p) for m in bucket.members]
        works = [w for w in found if w is not None and w.curvature is None]
        if len(works) == len(found) and all(w.t == works[0].t for w in works):
            stacked[id(bucket)] = Unit(works, bucket.moments, bucket)
    covered = {id(w.p) for u in stacked.values() for w in u.works}
    units = [*stacked.values(), *(Unit([w], w.state) for w in work if id(w.p) not in covered)]
    return units, stacked

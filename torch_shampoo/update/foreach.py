"""The step's elementwise lines for many small units at once: one ``torch._foreach_*`` call per
line, with the operation and scalars that :mod:`torch_shampoo.update.per_unit`'s line applies to
each unit alone (the line that the other units take)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import device
from ..state import state_dtype
from . import per_unit
from .grafting import SECOND_MOMENT, graft_directions, update_graft_states
from .per_unit import Unit

__all__ = ["directions", "gradients", "moments", "update_parameters"]

SMALL = 1 << 16
"""Units of at most this many elements are batched: a larger unit's kernels outweigh the call,
and batched, all units' new tensors live at once (100 × Linear(64, 64) stepped ~7% slower)."""

Plan = tuple[list[list[int]], list[int]]
"""Batches of two or more units (indices into the step's units), and the units alone."""


def _batches(units: list[Unit]) -> Plan:
    """Batches of the units that nothing tells apart (group, step, dtypes, device, moments; no
    guard flags nor prepared statistics), and the rest, as indices into ``units``."""
    keyed: dict[tuple, list[int]] = {}
    alone = []
    for i, u in enumerate(units):
        w = u.works[0]
        dtype = state_dtype(w.p)
        size = sum(v.p.numel() for v in u.works)
        if u.cells is not None or w.curvature is not None or w.p.dtype != dtype or size > SMALL:
            alone.append(i)
            continue
        key = (id(w.group), w.t, dtype, w.p.device, "exp_avg" in u.state)
        keyed.setdefault(key, []).append(i)
    batches = [b for b in keyed.values() if len(b) > 1]
    alone += [b[0] for b in keyed.values() if len(b) == 1]
    return batches, alone


def gradients(units: list[Unit]) -> Plan:
    """This step's gradient of every unit (:func:`.per_unit.gradient`, with the guard) and the
    statistics prepared outside the step (:func:`.per_unit.curvature`); returns the batches."""
    for u in units:
        u.g = per_unit.gradient(u)
    for u in units:
        per_unit.curvature(u)
    return _batches(units)


def moments(units: list[Unit], plan: Plan) -> None:
    """The first moment and the graft's second moment from the gradients, per unit or per
    batch of ``plan`` (:func:`.per_unit.update_moments`); the gradients are dropped. Moments
    stored in bfloat16 are float32 (:func:`.per_unit.widen`) until :func:`update_parameters`."""
    batches, alone = plan
    per_unit.widen(units)  # (bfloat16 state: float32 copies)
    for i in alone:
        per_unit.update_moments(units[i])
    for indices in batches:
        batch = [units[i] for i in indices]
        config, states = batch[0].config, [u.state for u in batch]
        grads = []
        for u in batch:
            assert u.g is not None
            grads.append(u.g)
        if "exp_avg" not in states[0]:  # β₁ = 0: m̂ is the gradient itself
            for u in batch:
                u.m_hat = u.g
        else:
            torch._foreach_lerp_([s["exp_avg"] for s in states], grads, 1.0 - config.beta1)
        if config.grafting in SECOND_MOMENT:
            v = [s["graft_v"] for s in states]
            update_graft_states(config.grafting, v, grads, config.grafting_beta2)
    for u in units:
        u.g = None


def directions(units: list[Unit], plan: Plan) -> None:
    """m̂ and the graft's direction of every unit (:func:`.per_unit.directions`), as ``plan``."""
    batches, alone = plan
    for i in alone:
        per_unit.directions(units[i])
    for indices in batches:
        batch = [units[i] for i in indices]
        first, config = batch[0], batch[0].config
        bias1, bias2 = first.works[0].bias
        if first.m_hat is None:
            avgs = [u.state["exp_avg"] for u in batch]
            m_hats = avgs if bias1 is None else device.divide(avgs, bias1)
            for u, m_hat in zip(batch, m_hats):
                u.m_hat = m_hat
        m_hats = []
        for u in batch:
            assert u.m_hat is not None
            m_hats.append(u.m_hat)
        v = [u.state["graft_v"] for u in batch] if config.grafting in SECOND_MOMENT else []
        found = graft_directions(
            config.grafting, v, m_hats, epsilon=config.grafting_epsilon, correction=bias2
        )
        for u, direction in zip(batch, found):
            u.direction = direction


def update_parameters(
    units: list[Unit], preconditioned: Sequence[torch.Tensor | None], plan: Plan
) -> None:
    """:func:`.per_unit.update_parameters` of every unit (batched as ``plan``), with Shampoo's
    direction ``preconditioned[i]`` for ``units[i]`` (None: the graft's)."""
    batches, alone = plan
    for i in alone:
        per_unit.update_parameters(units[i], preconditioned[i])
    for indices in batches:
        batch = [units[i] for i in indices]
        config = batch[0].config
        lr = per_unit.learning_rate(batch[0])
        if isinstance(lr, torch.Tensor):
            for i in indices:
                per_unit.update_parameters(units[i], preconditioned[i])
            continue
        updates = [units[i].step_direction(preconditioned[i]) for i in indices]
        if config.weight_decay != 0 and config.decoupled_weight_decay:
            decay = torch._foreach_mul([u.params() for u in batch], config.weight_decay)
            updates = list(torch._foreach_add(updates, decay))
        mu = config.momentum
        if mu != 0:
            buffers = [u.state["momentum_buffer"] for u in batch]
            torch._foreach_mul_(buffers, mu)
            torch._foreach_add_(buffers, updates)
            if config.nesterov:
                updates = list(torch._foreach_add(updates, torch._foreach_mul(buffers, mu)))
            else:
                updates = buffers
        params, steps = [], []
        for u, update in zip(batch, updates):
            rows = [w.param for w in u.works]
            params += rows
            steps += [update] if u.bucket is None else per_unit.rows_of(update, rows)
        torch._foreach_add_(params, steps, alpha=-lr)
    per_unit.narrow(units)  # (bfloat16 state: rounded back)

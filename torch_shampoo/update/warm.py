"""Warm-started Shampoo roots (``eigh_every`` > 1, ``EngineConfig.warm_roots``): each factor
keeps its eigenbasis Q (``state["bases"]``, a bucket's ``bases`` stacks). The pool's exact
eigh gives Q at a first and every ``eigh_every``-th root step (the same bases job as SOAP's);
the root steps between take one power iteration Q ← orth(F Q) on the device (SOAP's refresh,
:func:`~torch_shampoo.update.kernels.power_step`). Either way the root is
Q diag(λ + ε)^(−1/r) Qᵀ from the Rayleigh quotients λ = diag(QᵀFQ) of the current factors
(:func:`~torch_shampoo.update.kernels.eigen_roots`): docs/design.md, "Warm-started roots".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from .. import device
from ..config import EngineConfig
from ..roots.jobs import RootOutcome
from ..roots.staging import Slot
from . import kernels

__all__ = ["Scalars", "drifted", "roots_from_bases", "unusable"]


class Scalars(NamedTuple):
    """A root's settings at one step: F is divided by ``scale`` (bias correction), then
    X = (F/scale + εI)^(−1/``exponent``) (``relative``: ε·tr(F/scale)/d)."""

    scale: float
    exponent: float
    epsilon: float
    relative: bool

    @classmethod
    def of(cls, config: EngineConfig, t: int, factored: tuple[bool, ...]) -> Scalars:
        """The settings of a factor of ``factored`` dims whose statistics have ``t`` steps."""
        scale = 1.0 - config.beta2**t if config.bias_correction and config.beta2 < 1.0 else 1.0
        exponent = config.root_exponent or 2.0 * sum(factored)
        return cls(scale, exponent, config.epsilon_at(t), config.relative_epsilon)


def roots_from_bases(
    slot: Slot, scalars: Scalars, rows: Sequence[bool], power: bool
) -> torch.Tensor:
    """Write the roots of ``slot``'s ``rows`` (the others keep theirs) from its bases and current
    factors, after one power iteration of the bases if ``power`` (a warm root step). A row whose
    result is not usable (not finite, or λ_min + ε ≤ 0) keeps its root and basis. Returns the
    per-row usable flags on the device (no host sync here)."""
    assert slot.bases is not None
    factors = slot.snapshot()
    bases = kernels.power_step(slot.bases, factors) if power else slot.bases
    roots, ok, _ = kernels.eigen_roots(bases, factors, *scalars, drift=False)
    if not all(rows):
        ok = ok & device.small_tensor(list(rows), ok.device)
    keep = ok.view(-1, 1, 1)
    slot.install(torch.where(keep, roots, slot.full_roots()))
    if power:
        slot.bases.copy_(torch.where(keep, bases, slot.bases))
    return ok


def drifted(slots: Sequence[Slot], tolerance: float) -> bool:
    """Has a basis of ``slots`` drifted: ‖offdiag(QᵀFQ)‖_F > ``tolerance``·‖F‖_F for one of
    their factors (then the pool's exact eigh runs instead of a power iteration)? One host sync
    per slot; none when ``tolerance`` is 0 (off)."""
    if tolerance <= 0:
        return False
    for slot in slots:
        if slot.bases is not None:
            drift = kernels.basis_drift(slot.bases, slot.snapshot())
            if bool((drift > tolerance).any()):
                return True
    return False


def unusable(outcome: RootOutcome) -> RootOutcome:
    """An exact basis whose root is not usable (not finite, or λ_min + ε ≤ 0): a failure."""
    return replace(outcome, ok=False, reason="root from the eigenbasis not usable")

"""Per-group settings: the engine's view of a parameter group (:class:`EngineConfig`), which
:mod:`torch_shampoo.settings` maps the front ends' kwargs onto.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .settings import declared

__all__ = ["EngineConfig", "group_defaults", "is_dtensor", "revalidate", "world_size"]


@dataclass(frozen=True)
class EngineConfig:
    """The engine's view of one parameter group (Shampoo, SOAP and NG+ map their own kwargs)."""

    lr: float | torch.Tensor
    beta1: float
    beta2: float
    epsilon: float | Callable[[int], float]
    weight_decay: float
    decoupled_weight_decay: bool
    momentum: float
    nesterov: bool
    block_size: int
    max_factor_dim: int
    frequency: int
    start: int
    bias_correction: bool
    grafting: str
    grafting_beta2: float
    grafting_epsilon: float
    root_exponent: float | None
    root_method: str
    maximize: bool
    staleness: int | None
    """Steps between a later root cycle's snapshot and its use; None: auto."""
    max_root_failures: int
    skip_nonfinite: bool
    relative_epsilon: bool = False
    """ε is a multiple of each factor's mean eigenvalue tr(F)/d at the root step."""
    basis_refresh: bool = False
    """At a stale basis's install, one power iteration with the current factors."""
    eigh_every: int = 1
    """Every ``eigh_every``-th root step (and a first) has the pool compute exact bases (roots:
    1); the root steps between update the installed ones by one power iteration."""
    basis_tolerance: float = 0.0
    """Warm roots: a root step between exact ones runs the exact eigh instead where a basis
    drifted, ‖offdiag(QᵀFQ)‖_F > τ‖F‖_F (0: off)."""
    stagger_roots: bool | None = False
    """Later root cycles at each parameter's own phase of the frequency
    (:mod:`torch_shampoo.roots.phases`); else every parameter's at every f-th step; None
    ("auto"): staggered with async roots."""
    merge_dims: bool | str = True
    """How neighbouring dims merge before blocking (:mod:`torch_shampoo.layout.blocking`)."""
    precondition_1d: bool = True
    """Do 1-D parameters get a factor? (Else the graft alone steps them.)"""
    eigenbasis: bool = False
    """The pool computes each factor's eigenvectors, and the step runs Adam in that basis
    (eigenvalue-corrected Shampoo, :mod:`torch_shampoo.update.eigenbasis`); roots are not used."""
    root_dtype: torch.dtype = torch.float64
    """The pool solves roots (bases) in float64, or in float32 first, a failed one again in
    float64 (:func:`torch_shampoo.roots.matrix_roots.inverse_roots`)."""
    state_dtype: torch.dtype | None = None
    """Factors, roots (bases) and moments stored in this dtype (bfloat16), computed in float32 and
    rounded stochastically on write (:mod:`torch_shampoo.rounding`); None: the parameter's."""

    @property
    def warm_roots(self) -> bool:
        """Roots from eigenbases (Shampoo, ``eigh_every`` > 1): each factor keeps its basis; the
        pool's exact eigh refreshes it every ``eigh_every``-th root step, one power iteration
        on the device at the others, and the root is Q diag(λ + ε)^(−1/r) Qᵀ."""
        return not self.eigenbasis and self.eigh_every > 1

    def epsilon_at(self, step: int) -> float:
        """ε at ``step``; a schedule (NG+'s ``damping``) must give a positive finite number."""
        if not callable(self.epsilon):
            return self.epsilon
        try:
            value = float(self.epsilon(step))
        except Exception as exc:
            raise TypeError(
                f"Invalid damping: {self.epsilon!r} (calling it with step {step} failed: {exc})"
            ) from exc
        if not 0 < value < math.inf:
            raise ValueError(
                f"Invalid damping: {self.epsilon!r} (gave {value} at step {step}; must be > 0)"
            )
        return value


_NOT_RECHECKED = frozenset({"params", "param_names", "lr", "initial_lr"})
"""Group entries that may change at every step without a new validation (a scheduler's lr)."""


def revalidate(
    groups: Sequence[dict[str, Any]],
    seen: dict[int, list[Any]],
    validate: Callable[[dict[str, Any]], None],
) -> None:
    """``validate`` each group whose settings (an lr aside) changed since last ``seen``: a bad
    setting written into ``param_groups`` during training is refused at the next step."""
    for index, group in enumerate(groups):
        settings = [v for k, v in group.items() if k not in _NOT_RECHECKED]
        if seen.get(index) == settings:
            continue
        try:
            validate(group)
        except (ValueError, TypeError) as error:
            raise type(error)(f"param_groups[{index}]: {error}") from None
        seen[index] = settings


def world_size() -> int:
    """Processes in ``torch.distributed``'s default group (1 when there is none)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_dtensor(t: torch.Tensor) -> bool:
    """Is ``t`` a ``torch.distributed`` DTensor (FSDP2's ``fully_shard``, tensor parallelism)?"""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False  # (the common case, asked per parameter per step: no import)
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def group_defaults(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The per-group settings among a constructor's ``arguments`` (not the constructor-only)."""
    return {k: arguments[k] for k in declared(arguments)}

"""Grafting: the first-order methods whose step size Shampoo borrows.

Per block, Shampoo's direction P takes the size of the graft's direction D, P ← P·‖D‖/‖P‖
(Agarwal et al., "Disentangling adaptive gradient methods"). D is made from the bias-corrected
first moment m̂ and at most one second moment v, updated from the gradient g at every step:

=========  ==========================================  ===========================
graft      v update                                    D
=========  ==========================================  ===========================
sgd        (none)                                      m̂
adagrad    v ← v + g²                                  m̂ / (√v + ε)
rmsprop    v ← β₂v + (1 − β₂)g²                        m̂ / (√v + ε)
adam       v ← β₂v + (1 − β₂)g²                        m̂ / (√(v / (1 − β₂ᵗ)) + ε)
none       (none)                                      no graft: P keeps its own size
=========  ==========================================  ===========================

Adam's bias correction is dropped when the optimizer's ``bias_correction`` is off.
"""

from __future__ import annotations

import torch

from .. import device

__all__ = [
    "GRAFTS",
    "SECOND_MOMENT",
    "graft_direction",
    "graft_directions",
    "update_graft_state",
    "update_graft_states",
]

GRAFTS: tuple[str, ...] = ("adam", "adagrad", "rmsprop", "sgd", "none")
SECOND_MOMENT: tuple[str, ...] = ("adam", "adagrad", "rmsprop")
"""The grafts that keep a second moment ``graft_v``."""


def update_graft_state(
    graft: str,
    state: dict[str, torch.Tensor],
    grad: torch.Tensor,
    beta2: float,
    keep: torch.Tensor | None = None,
) -> None:
    """Fold this step's gradient into ``state["graft_v"]`` (where ``keep`` is True, if given)."""
    if graft not in SECOND_MOMENT:
        return
    v = state["graft_v"]
    if keep is not None:
        decay, weight = (1.0, 1.0) if graft == "adagrad" else (beta2, 1.0 - beta2)
        torch.where(keep, (v * decay).addcmul_(grad, grad, value=weight), v, out=v)
    else:
        update_graft_states(graft, [v], [grad], beta2)


def update_graft_states(
    graft: str, v: list[torch.Tensor], grads: list[torch.Tensor], beta2: float
) -> None:
    """:func:`update_graft_state` of many second moments ``v``, unmasked, in ``_foreach_`` calls."""
    if graft == "adagrad":
        torch._foreach_addcmul_(v, grads, grads)
    elif graft in ("adam", "rmsprop"):
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)


def graft_direction(
    graft: str,
    state: dict[str, torch.Tensor],
    m_hat: torch.Tensor,
    *,
    epsilon: float,
    correction: torch.Tensor | None,
) -> torch.Tensor | None:
    """The graft's direction D for the whole parameter, or ``None`` for ``graft="none"``;
    ``correction`` is Adam's 1 − β₂ᵗ (None: no bias correction)."""
    v = [state["graft_v"]] if graft in SECOND_MOMENT else []
    return graft_directions(graft, v, [m_hat], epsilon=epsilon, correction=correction)[0]


def graft_directions(
    graft: str,
    v: list[torch.Tensor],
    m_hats: list[torch.Tensor],
    *,
    epsilon: float,
    correction: torch.Tensor | None,
) -> list[torch.Tensor | None]:
    """:func:`graft_direction` of many tensors at once, all of one step (one ``correction``)."""
    if graft in ("none", "sgd"):
        return [None if graft == "none" else m for m in m_hats]
    if graft == "adam" and correction is not None:
        denoms = device.divide(v, correction)
        torch._foreach_sqrt_(denoms)
    else:
        denoms = list(torch._foreach_sqrt(v))
    torch._foreach_add_(denoms, epsilon)
    return list(torch._foreach_div(m_hats, denoms))

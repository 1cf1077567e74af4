"""Grafting: the first-order methods whose step size Shampoo borrows.

Shampoo supplies the direction P of each block; a diagonal method supplies the direction D whose
size Shampoo adopts, P ← P·‖D‖/‖P‖ (Agarwal et al., "Disentangling adaptive gradient methods").
Every method here reads the bias-corrected first moment m̂ and keeps at most one elementwise
second-moment tensor v, updated from the gradient g at every step:

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

__all__ = ["GRAFTS", "graft_direction", "update_graft_state"]

GRAFTS: tuple[str, ...] = ("adam", "adagrad", "rmsprop", "sgd", "none")


def update_graft_state(
    graft: str,
    state: dict[str, torch.Tensor],
    grad: torch.Tensor,
    beta2: float,
    keep: torch.Tensor | None = None,
) -> None:
    """Fold this step's gradient into the second moment ``state["graft_v"]``, only where
    ``keep`` is True when a mask is given."""
    if graft not in ("adam", "adagrad", "rmsprop"):
        return
    v = state["graft_v"]
    if keep is not None:
        decay = 1.0 if graft == "adagrad" else beta2
        weight = 1.0 if graft == "adagrad" else 1.0 - beta2
        torch.where(keep, (v * decay).addcmul_(grad, grad, value=weight), v, out=v)
    elif graft == "adagrad":
        v.addcmul_(grad, grad)
    else:
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


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
    if graft == "none":
        return None
    if graft == "sgd":
        return m_hat
    v = state["graft_v"]
    if graft == "adam" and correction is not None:
        denom = (v / correction).sqrt_()
    else:
        denom = v.sqrt()
    return m_hat / denom.add_(epsilon)

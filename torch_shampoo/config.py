"""Per-group settings: the engine's view of a parameter group, and their validation.

Front ends (Shampoo, NG+) declare their kwargs, validate each group with :class:`Checks` (every
error names the argument and its value) and map it onto an :class:`EngineConfig`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Checks",
    "EngineConfig",
    "group_defaults",
    "is_dtensor",
    "reject_unknown",
    "revalidate",
    "staleness_setting",
    "world_size",
]

_NOT_PER_GROUP = frozenset(
    {
        "self",
        "params",
        "async_roots",
        "root_workers",
        "partition_roots",
        "partition_state",
        "compact_state",
        "model",
        "statistics",
        "unknown",
    }
)

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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
    """Eigenbasis only: every ``eigh_every``-th root step (and a first) has the pool compute
    exact bases; the root steps between update the installed ones by one power iteration."""
    merge_dims: bool | str = True
    """How neighbouring dims merge before blocking (:mod:`torch_shampoo.blocking`)."""
    vectors: bool = True
    """Do 1-D parameters get a factor? (Else the graft alone steps them.)"""
    eigenbasis: bool = False
    """The pool computes each factor's eigenvectors, and the step runs Adam in that basis
    (eigenvalue-corrected Shampoo, :mod:`torch_shampoo.eigenbasis`); roots are not used."""

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
    """``validate`` each group whose settings changed since they were last seen (``seen``, by
    group index; an lr aside): a setting written into ``param_groups`` during training is
    refused at the next step, naming the group and the value, before anything changes."""
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
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False  # (the common case, asked per parameter per step: no import)
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def staleness_setting(value: int | str | None) -> int | None:
    """A group's ``root_staleness`` as the engine sees it: an integer, or None for auto."""
    return None if value is None or isinstance(value, str) else int(value)


class Checks:
    """Validation of one parameter group: each check raises naming the argument and its value."""

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group

    def bad(self, name: str, requirement: str) -> ValueError:
        return ValueError(f"Invalid {name}: {self.group[name]!r} ({requirement})")

    def real(
        self,
        name: str,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        """A finite real number in the given (closed unless told open) interval."""
        value = self.group[name]
        if isinstance(value, torch.Tensor) and value.numel() == 1 and name == "lr":
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Invalid {name}: {self.group[name]!r} (must be a real number)")
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise self.bad(name, "must be finite and within float32 range")
        if low is not None and (value < low or (low_open and value == low)):
            raise self.bad(name, f"must be {'>' if low_open else '≥'} {low}")
        if high is not None and (value > high or (high_open and value == high)):
            raise self.bad(name, f"must be {'<' if high_open else '≤'} {high}")
        return float(value)

    def integer(self, name: str, minimum: int, optional: bool = False) -> None:
        value = self.group[name]
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Invalid {name}: {value!r} (must be an integer)")
        if value < minimum:
            raise self.bad(name, f"must be ≥ {minimum}")

    def staleness(self) -> None:
        """``root_staleness``: ``"auto"`` (or None, the same) or an integer ≥ 0."""
        if self.group["root_staleness"] not in ("auto", None):
            self.integer("root_staleness", 0)

    def flag(self, name: str) -> None:
        if not isinstance(self.group[name], bool):
            raise TypeError(f"Invalid {name}: {self.group[name]!r} (must be a bool)")

    def merge(self) -> None:
        """``merge_dims``: a bool, or ``"all"``."""
        value = self.group["merge_dims"]
        if not isinstance(value, bool) and value != "all":
            raise self.bad("merge_dims", "must be True, False or 'all'")

    def choice(self, name: str, choices: tuple[str, ...]) -> None:
        if self.group[name] not in choices:
            raise self.bad(name, f"valid choices: {', '.join(choices)}")

    def momentum(self) -> None:
        """``momentum`` in [0, 1) and ``nesterov`` (a bool) only with momentum > 0."""
        self.flag("nesterov")
        mu = self.real("momentum", low=0.0, high=1.0, high_open=True)
        if self.group["nesterov"] and mu == 0:
            raise self.bad("nesterov", "Nesterov momentum needs momentum > 0")

    def blocks_and_schedule(self) -> None:
        """Shampoo's and SOAP's block sizes and root schedule."""
        self.integer("block_size", 1)
        self.integer("max_factor_dim", 1)
        self.integer("precondition_frequency", 1)
        self.integer("max_root_failures", 1)
        self.integer("start_preconditioning_step", 1, optional=True)
        self.staleness()

    def lr(self) -> None:
        lr = self.group["lr"]
        if isinstance(lr, torch.Tensor) and (lr.dim() != 0 or not lr.is_floating_point()):
            raise TypeError(f"Invalid lr: {lr!r} (a tensor lr must be a 0-d real float tensor)")
        self.real("lr", low=0.0)


def group_defaults(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The per-group hyperparameters among a constructor's arguments (its ``locals()`` taken
    first thing), so each front end declares its kwargs once, in its signature."""
    return {
        k: v for k, v in arguments.items() if k not in _NOT_PER_GROUP and not k.startswith("__")
    }


def reject_unknown(
    owner: str, unknown: Mapping[str, Any], known: Iterable[str], hints: Mapping[str, str]
) -> None:
    """A TypeError for unknown keyword arguments that says what was probably meant."""
    if not unknown:
        return
    name = sorted(unknown)[0]
    hint = hints.get(name)
    if hint is None:
        close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
        hint = " or ".join(f"'{c}'" for c in close)
    meant = f": did you mean {hint}?" if hint else ""
    raise TypeError(f"{owner} got an unexpected keyword argument '{name}'{meant}")

"""The declarative checks of :mod:`torch_shampoo.settings`: each is called with a setting's name
and value and raises ``Invalid <name>: <value!r> (<requirement>)`` (a TypeError for a value of
the wrong kind, else a ValueError)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Betas", "Check", "Choice", "Damping", "Flag", "Integer", "Lr", "Merge", "Model", "Real",
    "Staleness", "StateDtype", "Workers", "bad",
]  # fmt: skip

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def bad(name: str, value: Any, requirement: str, error: type[Exception] = ValueError) -> Exception:
    """The error a check raises: ``Invalid <name>: <value!r> (<requirement>)``."""
    return error(f"Invalid {name}: {value!r} ({requirement})")


@dataclass(frozen=True)
class Real:
    """A finite real number (within float32's range) in an interval, closed unless told open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None allowed

    def __call__(self, name: str, value: Any, shown: Any = None) -> None:
        shown = value if shown is None else shown
        if self.optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(name, shown, "must be a real number", TypeError)
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise bad(name, shown, "must be finite and within float32 range")
        low, high = self.low, self.high
        if low is not None and (value < low or (self.low_open and value == low)):
            raise bad(name, shown, f"must be {'>' if self.low_open else '≥'} {low}")
        if high is not None and (value > high or (self.high_open and value == high)):
            raise bad(name, shown, f"must be {'<' if self.high_open else '≤'} {high}")


@dataclass(frozen=True)
class Integer:
    minimum: int
    optional: bool = False  # None allowed

    def __call__(self, name: str, value: Any) -> None:
        if self.optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(name, value, "must be an integer", TypeError)
        if value < self.minimum:
            raise bad(name, value, f"must be ≥ {self.minimum}")


@dataclass(frozen=True)
class Flag:
    def __call__(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise bad(name, value, "must be a bool", TypeError)


@dataclass(frozen=True)
class Choice:
    choices: tuple[Any, ...]

    def __call__(self, name: str, value: Any) -> None:
        if not any(isinstance(value, type(c)) and value == c for c in self.choices):
            raise bad(name, value, f"valid choices: {', '.join(map(str, self.choices))}")


@dataclass(frozen=True)
class StateDtype:
    """``state_dtype``: None (the parameter's) or ``torch.bfloat16``; float16 is refused."""

    def __call__(self, name: str, value: Any) -> None:
        if value is None or value == torch.bfloat16:
            return
        if value == torch.float16:
            why = "float16's range, 6e-5 to 65504 in normal numbers, flushes small second moments"
            raise bad(name, value, f"{why} and overflows roots: use torch.bfloat16")
        kind = ValueError if isinstance(value, torch.dtype) else TypeError
        raise bad(name, value, "valid choices: None, torch.bfloat16", kind)


@dataclass(frozen=True)
class Merge:
    def __call__(self, name: str, value: Any) -> None:
        if not isinstance(value, bool) and value != "all":
            raise bad(name, value, "must be True, False or 'all'")


@dataclass(frozen=True)
class Staleness:
    """``root_staleness``: ``"auto"`` (or None, the same) or an integer ≥ 0."""

    def __call__(self, name: str, value: Any) -> None:
        if value not in ("auto", None):
            Integer(0)(name, value)


@dataclass(frozen=True)
class Lr:
    """A real ≥ 0, or a 0-d real float tensor holding one."""

    def __call__(self, name: str, value: Any) -> None:
        number = value
        if isinstance(value, torch.Tensor):
            if value.dim() != 0 or not value.is_floating_point():
                raise bad(name, value, "a tensor lr must be a 0-d real float tensor", TypeError)
            number = float(value)
        Real(low=0.0)(name, number, shown=value)


@dataclass(frozen=True)
class Betas:
    """A pair of numbers in [0, 1] (``high_open``: [0, 1))."""

    high_open: bool = False

    def __call__(self, name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise bad(name, value, "must be a pair (beta1, beta2)")
        for i, beta in enumerate(value):
            number = not isinstance(beta, bool) and isinstance(beta, (int, float))
            if not number or not (0 <= beta < 1 if self.high_open else 0 <= beta <= 1):
                interval = "[0, 1)" if self.high_open else "[0, 1]"
                raise bad(name, value, f"beta{i + 1} must be a number in {interval}")


@dataclass(frozen=True)
class Damping:
    """A real > 0, or a function of the step (checked when called: EngineConfig.epsilon_at)."""

    def __call__(self, name: str, value: Any) -> None:
        if isinstance(value, (torch.nn.Module, torch.Tensor)):
            raise bad(name, value, "a number or a function of the step", TypeError)
        if not callable(value):
            Real(low=0.0, low_open=True)(name, value)


@dataclass(frozen=True)
class Workers:
    """``root_workers``: None (half the cores) or an integer ≥ 1 (as the engine checks it)."""

    def __call__(self, name: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(name, value, "must be a positive integer")


@dataclass(frozen=True)
class Model:
    def __call__(self, name: str, value: Any) -> None:
        if value is not None and not isinstance(value, torch.nn.Module):
            raise bad(name, value, "must be a torch.nn.Module", TypeError)


Check = (
    Real | Integer | Flag | Choice | Merge | Staleness | Lr | Betas | Damping | Workers | Model
    | StateDtype
)

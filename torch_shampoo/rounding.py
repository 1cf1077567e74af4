"""Low-precision state (``state_dtype=torch.bfloat16``): stored in bfloat16, computed in float32.

A value written back is rounded *stochastically*: up with probability equal to its distance from
the lower bfloat16 neighbour over their gap, so the rounding is unbiased and an increment far
below bfloat16's half-ulp (a second moment v ← β₂v + (1 − β₂)g² with β₂ = 0.999 changes v by
0.1%, bfloat16's half-ulp is 0.2–0.4%) survives in expectation instead of being lost at every
step. The noise comes from the element's position and a hash of the seed (the step), computed
on the tensor's device: no random generator is read, so runs are bitwise reproducible and
asynchronous roots change no bit.
"""

from __future__ import annotations

import torch

__all__ = ["LOW", "narrow", "seed_of"]

LOW: tuple[torch.dtype, ...] = (torch.bfloat16,)
"""The storage dtypes that are computed in float32 and rounded on write."""

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_SALTS = {"moments": 1, "load": 2}


def _mix(z: int) -> int:
    """splitmix64's finalizer, to 32 bits (on the host: a seed, not a tensor)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & _M32


def seed_of(step: int, key: str, index: int = 0) -> int:
    """The seed of one write: the step, what is written (``key``) and which of its stacks."""
    return (step * 0x9E3779B97F4A7C15 + _SALTS.get(key, 7) * 0xBF58476D1CE4E5B9 + index) & _M64


def _signed(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


_A = 0x9E3779B1
_ROW = 1 << 12


def _weyl(n: int, start: int, device: torch.device) -> torch.Tensor:
    """(i × A + start) mod 2³² for i < n, as int32 that wraps: with i = r·2¹² + c, one add of a
    row's r·(2¹²·A) and a column's c·A + start, broadcast (0.1 ms against 0.67 ms for arange,
    multiply and add over 2.1 M elements, one thread); the same integers."""
    rows = -(-n // _ROW)
    r = torch.arange(rows, dtype=torch.int32, device=device).mul_(_signed(_ROW * _A & _M32))
    c = torch.arange(min(n, _ROW), dtype=torch.int32, device=device).mul_(_signed(_A)).add_(start)
    out = torch.empty((rows, c.numel()), dtype=torch.int32, device=device)
    return torch.add(r.view(-1, 1), c.view(1, -1), out=out).view(-1)[:n]


def narrow(value: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``value`` (float32, float64) in ``dtype``: stochastically rounded for bfloat16, as
    ``.to(dtype)`` otherwise. 16 noise bits are added below the kept ones, then cut: unbiased;
    a value already in bfloat16 is kept exactly, and so are ±inf and the NaNs arithmetic makes.
    The noise is the top 16 bits of (position × A + hash(seed)) mod 2³² (A odd, near 2³²/φ: a
    Weyl sequence, equidistributed over positions, and over seeds), in int32 arithmetic that
    wraps, in place: six operations on the device."""
    if dtype not in LOW or not value.is_floating_point() or value.dtype.itemsize < 4:
        return value.to(dtype)
    value = value.detach().to(torch.float32).contiguous()  # (float64: to nearest first)
    x = _weyl(value.numel(), _signed(_mix(seed)), value.device).view(value.shape)
    x.bitwise_right_shift_(16).bitwise_and_(0xFFFF)
    x.add_(value.view(torch.int32)).bitwise_and_(-65536)  # 0xFFFF0000: bfloat16's bits
    return x.view(torch.float32).to(dtype)  # exact: the low 16 bits are zero


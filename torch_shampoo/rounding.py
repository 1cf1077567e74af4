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

__all__ = ["CHUNK", "DEVICE_CHUNK", "LOW", "narrow", "round_", "seed_of"]

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

CHUNK = 1 << 17
"""On the CPU :func:`round_` rounds by chunks of this many elements (512 KiB of noise): made,
used and overwritten in a core's cache. No tensor the size of the whole is made: an int32 noise
tensor and a bfloat16 result of every moment had raised the first steps' peak (3 × Linear(d, d),
``benchmarks.memory --sections peak``: 510 → 349 MB for bfloat16 "auto"; the step time the
same within noise)."""
DEVICE_CHUNK = 1 << 24
"""The same on a GPU (a few launches per 16 M elements; no int32 tensor of a whole model)."""

_STEPS: dict[torch.device, torch.Tensor] = {}


def _steps(n: int, device: torch.device) -> torch.Tensor:
    """i × A mod 2³² for i < n, as int32 that wraps (kept per device, grown when too short)."""
    have = _STEPS.get(device)
    if have is None or have.numel() < n:
        i = torch.arange(n, dtype=torch.int64, device=device)
        have = _STEPS[device] = ((i * _A + 2**31) % 2**32 - 2**31).to(torch.int32)
    return have[:n]


def narrow(value: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``value`` (float32, float64) in ``dtype``: stochastically rounded for bfloat16 (a float32
    copy :func:`round_`, then cast exactly), as ``.to(dtype)`` otherwise."""
    if dtype not in LOW or not value.is_floating_point() or value.dtype.itemsize < 4:
        return value.to(dtype)
    copy = value.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return round_(copy, seed).to(dtype)  # exact: the low 16 bits are zero


def round_(value: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """``value`` (float32, contiguous) rounded stochastically to bfloat16's values, in place, and
    returned. 16 noise bits are added below the kept ones, then cut: unbiased; a value already in
    bfloat16 is kept exactly, and so are ±inf and the NaNs arithmetic makes. The noise of the
    element at flat position i is the top 16 bits of ((``offset`` + i) × A + hash(seed)) mod
    2³² (A odd, near 2³²/φ: a Weyl sequence, equidistributed over positions, and over seeds), so
    parts rounded at their offsets get the bits of the whole. int32 arithmetic that wraps, by
    chunks of :data:`CHUNK` elements on the CPU (:data:`DEVICE_CHUNK` on a GPU)."""
    if value.dtype != torch.float32 or not value.is_contiguous():
        raise ValueError(
            f"round_ takes a contiguous float32 tensor, got {value.dtype}"
            f"{'' if value.is_contiguous() else ' (not contiguous)'}"
        )
    bits, n, start = value.view(-1).view(torch.int32), value.numel(), _signed(_mix(seed))
    if n == 0:
        return value
    size = min(n, CHUNK if value.device.type == "cpu" else DEVICE_CHUNK)
    steps = _steps(size, value.device)
    noise = torch.empty(size, dtype=torch.int32, device=value.device)
    for a in range(0, n, size):
        b = min(a + size, n)
        x = noise[: b - a]
        torch.add(steps[: b - a], _signed((offset + a) * _A + start & _M32), out=x)
        x.bitwise_right_shift_(16).bitwise_and_(0xFFFF)
        bits[a:b].add_(x).bitwise_and_(-65536)  # 0xFFFF0000: bfloat16's bits
    return value

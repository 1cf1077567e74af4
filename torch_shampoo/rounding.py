"""Low-precision state (``state_dtype=torch.bfloat16``): stored in bfloat16, computed in float32.

A value written back is rounded *stochastically*: up with probability equal to its distance from
the lower bfloat16 neighbour over their gap, so the rounding is unbiased and an increment far
below bfloat16's half-ulp (F ← β₂F + (1 − β₂)GGᵀ with β₂ = 0.999 changes F by 0.1%, bfloat16's
half-ulp is 0.2–0.4%) survives in expectation instead of being lost at every step. The noise is
a hash of (element index, seed) computed on the tensor's device: no random generator is read,
so runs are bitwise reproducible and asynchronous roots change no bit.
"""

from __future__ import annotations

import torch

__all__ = ["LOW", "narrow", "seed_of", "write"]

LOW: tuple[torch.dtype, ...] = (torch.bfloat16,)
"""The storage dtypes that are computed in float32 and rounded on write."""

_M32 = 0xFFFFFFFF
_SALTS = {"moments": 1, "load": 2}


def seed_of(step: int, key: str, index: int = 0) -> int:
    """The seed of one write: the step, what is written (``key``) and which of its stacks."""
    return (step * 0x9E3779B1 + _SALTS.get(key, 6) * 0x85EBCA77 + index * 0xC2B2AE3D) & _M32


def _noise(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """n 16-bit integers (int32), a hash of (position, seed): a multiply, xor-shift, multiply
    (in int64, every product below 2⁶³), keeping the top 16 of 32 bits."""
    x = torch.arange(n, dtype=torch.int64, device=device).mul_(0x9E3779B1).add_(seed & _M32)
    x.bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(0x2C1B3C6D).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 13).mul_(0x297A2D39).bitwise_and_(_M32)
    return (x >> 16).to(torch.int32)


def narrow(value: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``value`` (float32) in ``dtype``: stochastically rounded for bfloat16 (16 random bits
    added below the kept ones, then cut: unbiased; a value already in bfloat16 is kept exactly;
    ±inf and NaN stay what they are), as ``.to(dtype)`` otherwise."""
    if dtype not in LOW or value.dtype != torch.float32:
        return value.to(dtype)
    bits = value.detach().contiguous().view(torch.int32).clone()
    finite = torch.isfinite(value)
    bits.add_(_noise(bits.numel(), seed, bits.device).view(bits.shape))
    bits.bitwise_and_(-65536)  # 0xFFFF0000: bfloat16's bits of float32
    rounded = bits.view(torch.float32).to(dtype)  # exact: the low 16 bits are zero
    return torch.where(finite, rounded, value.to(dtype))


def write(target: torch.Tensor, value: torch.Tensor, seed: int) -> None:
    """``target`` ← ``value``, rounded as :func:`narrow` does for a low-precision ``target``."""
    target.copy_(narrow(value, target.dtype, seed) if target.dtype != value.dtype else value)

"""Shared test helpers: a model with mixed parameter shapes, a deterministic training loop, a
compiled run that fails on a recompile after its warm-up, and the one bitwise comparison."""

from __future__ import annotations

import gc
import io
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
from torch import nn

T = TypeVar("T")


class MixedShapes(nn.Module):
    """A model whose parameters are 0-d, 1-d, 2-d, 3-d and 4-d, one of them larger than a block."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, dtype=dtype)
        self.mix = nn.Parameter(torch.randn(3, 4, 5, dtype=dtype) * 0.3)
        self.fc = nn.Linear(4 * 5 * 5, 24, dtype=dtype)
        self.out = nn.Linear(24, 3, dtype=dtype)
        self.gain = nn.Parameter(torch.tensor(1.0, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))  # (B, 4, 5, 5)
        h = h + 0.1 * torch.einsum("abc,nbhc->nbhc", self.mix, h)
        h = torch.tanh(self.fc(h.flatten(1)))
        return self.gain * self.out(h)


Batch = tuple[torch.Tensor, torch.Tensor]


def make_batches(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 2, 5, 5, generator=gen, dtype=dtype),
            torch.randn(8, 3, generator=gen, dtype=dtype),
        )
        for _ in range(n)
    ]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[Batch],
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    losses = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(i)
    return losses


def train_share(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], rank: int, world: int
) -> None:
    """Train on this rank's share of every batch (rank r of world w: the r-th w-th)."""
    for x, y in batches:
        share = x.shape[0] // world
        lo = rank * share
        opt.zero_grad()
        nn.functional.mse_loss(model(x[lo : lo + share]), y[lo : lo + share]).backward()
        opt.step()


DISTRIBUTED_KWARGS: dict[str, dict[str, Any]] = {
    # short cycles, fixed staleness (roots in flight at most steps) and schedule (stagger
    # "auto" is off under several processes, on in one); ε = 1e-4 keeps rounding
    # differences of the mean gradient at rounding size
    "shampoo": dict(lr=0.01, block_size=16, precondition_frequency=4, root_staleness=3,
                    stagger_roots=False, epsilon=1e-4),
    "ngplus": dict(lr=0.01, block_size=16, inverse_frequency=4, root_staleness=3,
                   stagger_roots=False),
    "soap": dict(lr=0.01, block_size=16, precondition_frequency=4, root_staleness=3,
                 stagger_roots=False, eps=1e-4, eigh_every=2),
}
"""Each front end's kwargs in the multi-process tests."""


def mixed_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> MixedShapes:
    torch.manual_seed(seed)
    return MixedShapes(dtype)


def root_threads() -> int:
    """The root worker threads alive in this process."""
    return sum(t.name.startswith("torch_shampoo-root") for t in threading.enumerate())


def threads_settle_at(
    expected: int, count: Callable[[], int] = root_threads, at_most: bool = False
) -> bool:
    """Wait (up to 10 s) for ``count()`` to reach ``expected`` (``at_most``: or fewer, for counts
    of every thread, where another library's may exit meanwhile): closed pools do not join their
    workers, which exit on their own once their current root is done."""
    deadline = time.monotonic() + 10.0
    reached = (lambda: count() <= expected) if at_most else (lambda: count() == expected)
    while not reached() and time.monotonic() < deadline:
        time.sleep(0.01)
    return reached()


def settled(count: Callable[[], int] = root_threads) -> int:
    """``count()`` once collected optimizers' workers have exited (stable for 50 ms)."""
    gc.collect()
    previous = -1
    deadline = time.monotonic() + 10.0
    while (now := count()) != previous and time.monotonic() < deadline:
        previous = now
        time.sleep(0.05)
    return now


def roundtrip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def saved_and_loaded(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s parameters, detached."""
    return [p.detach().clone() for p in model.parameters()]


def checkpoints_across(
    make: Callable[[bool], tuple[nn.Module, torch.optim.Optimizer]],
    train_it: Callable[[nn.Module, torch.optim.Optimizer], None],
) -> list[tuple[bool, dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    """Per layout ``packed`` (``make(packed)``: a model and its optimizer): the state dict after
    ``train_it``, and that state dict loaded by the other layout and saved again after one step
    of zero gradients (β₂ = 1 and not a root step: the factors add exact zeros), so that the
    loaded matrices are stacked and packed; with the loading optimizer's states (its views).
    Returns (packed, saved, saved again, views) per layout."""
    saved = {}
    for packed in (False, True):
        model, opt = make(packed)
        with opt:  # type: ignore[attr-defined]
            train_it(model, opt)
            saved[packed] = opt.state_dict()
    out = []
    for packed in (False, True):
        model, opt = make(not packed)
        with opt:  # type: ignore[attr-defined]
            opt.load_state_dict(saved[packed])
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            again = opt.state_dict()["state"]
            views = [opt.state[p] for p in model.parameters()]
        out.append((packed, saved[packed]["state"], again, views))
    return out


def per_matrix(fake: Any) -> Any:
    """A stand-in for ``root_pool.inverse_roots`` (which solves a job's (k, d, d) stack) that
    calls ``fake`` the way ``matrix_roots.inverse_root`` is called, once per matrix (in float64:
    the batch's ``dtype``, float32 roots first, is not passed on)."""

    def solve_each(matrices: Any, *args: Any, dtype: Any = None, **kwargs: Any) -> Any:
        return [fake(matrix, *args, **kwargs) for matrix in matrices]

    return solve_each


def without_recompiles(run: Callable[[Callable[[int], None]], T]) -> T:
    """``run(after)``, which calls ``after(i)`` after its step ``i``, with dynamo failing on a
    recompile once step 3 is done (the warm-up: a first step, a root step, an install step, a
    plain step) and on reaching the recompile limit (past which dynamo would run the function
    eagerly without a word). A recompile fails the test naming what was compiled again."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, RecompileError

    def after(i: int) -> None:
        if i == 3:
            torch._dynamo.config.error_on_recompile = True

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return run(after)
    except (FailOnRecompileLimitHit, RecompileError) as error:
        # Report the cause in a few lines, not dynamo's stack.
        pytest.fail(f"the compiled step keeps recompiling: {type(error).__name__}: {error}")
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def square_net() -> nn.Module:
    """Linear(8, 8) → tanh → Linear(8, 8), no biases, from seed 0 (the compile tests' model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False))


def square_batches(n: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (16 × 8 inputs, 16 × 8 targets) batches from seed 8, for :func:`square_net`."""
    gen = torch.Generator().manual_seed(8)
    return [(torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen))
            for _ in range(n)]  # fmt: skip


def compiled_and_eager(
    build: Callable[[], tuple[nn.Module, Any]], batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters after training ``build()``'s model and optimizer on ``batches`` (MSE) with
    ``torch.compile(opt.step, backend="eager")``, failing on a recompile after the warm-up
    (:func:`without_recompiles`), and then eagerly."""

    def run(after: Callable[[int], None] | None) -> list[torch.Tensor]:
        model, opt = build()
        step = opt.step if after is None else torch.compile(opt.step, backend="eager")
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step()
            if after is not None:
                after(i)
        opt.close()
        return [p.detach().clone() for p in model.parameters()]

    return without_recompiles(run), run(None)


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """The same number of tensors, pairwise of the same dtype, device and shape and bitwise
    equal (``torch.equal``: a NaN equals nothing); a failure names the pair and, for values,
    the largest difference."""
    assert len(a) == len(b), f"{len(a)} tensors against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x.dtype, x.device, x.shape) == (y.dtype, y.device, y.shape), (
            f"tensor {i}: {x.dtype}, {x.device}, {tuple(x.shape)} against "
            f"{y.dtype}, {y.device}, {tuple(y.shape)}"
        )
        assert torch.equal(x, y), f"tensor {i} differs by {(x.double() - y.double()).abs().max()}"

"""How far Shampoo's non-root ``optimizer.step()`` on a small model is from the bare tensor work.

The *floor* is the digits CNN's step written by hand as the tensor operations it needs and
nothing else: the graft's moments and direction as ``_foreach_`` calls over all parameters,
F ← β₂F + (1−β₂)·G Gᵀ as one batched matmul per block stack and factored dim, P = X_L M X_R
by the package's own batched kernels, the per-block graft rescale, one update. No state checks,
no guard, no bookkeeping: what an eager step cannot go below without fusing kernels. It is timed
interleaved with this checkout's non-root steps (and Adam's), at the same block size (128),
on the same fixed gradients, 1 intra-op thread; ``--compare OTHER`` adds another checkout.

    python benchmarks/step_floor.py
    python benchmarks/step_floor.py --compare ../pre-bucket-checkout
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bucket_ab import ROOT, load_package

FREQUENCY = 10

# Block stacks (n, *block) of each parameter as the package lays the digits CNN out at block
# size 128: conv kernels (out, in, kh·kw) with size-1 dims dropped; Linear(512, 64) is four
# (64, 128) blocks side by side.
STACKS: list[tuple[int, ...] | None] = [
    (1, 16, 9), (1, 16), (1, 32, 16, 9), (1, 32), None, (1, 64), (1, 10, 64), (1, 10)
]  # fmt: skip


def digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(  # examples/train_digits.py's model
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def stack_of(i: int, x: torch.Tensor) -> torch.Tensor:
    shape = STACKS[i]
    if shape is None:  # (64, 512) -> (4, 64, 128), a copy
        return x.view(64, 4, 128).transpose(0, 1).contiguous()
    return x.reshape(shape)


class Floor:
    """The bare step (Adam-grafted Shampoo, β = (0.9, 0.999), roots fixed), with the package's
    own matrix kernels (``kernels``: its pure tensor functions)."""

    def __init__(self, params: list[torch.Tensor], kernels: Any) -> None:
        self.params, self.kernels = params, kernels
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.factors, self.roots = [], []
        for i, p in enumerate(params):
            blocks = stack_of(i, p)
            n = blocks.shape[0]
            self.factors.append([torch.zeros(n, d, d) for d in blocks.shape[1:]])
            self.roots.append([torch.eye(d).expand(n, d, d).clone() for d in blocks.shape[1:]])
        self.bias1, self.bias2 = torch.tensor(0.5), torch.tensor(0.3)

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.exp_avg, grads, 0.1)  # type: ignore[arg-type]
        torch._foreach_mul_(self.v, 0.999)
        torch._foreach_addcmul_(self.v, grads, grads, value=0.001)  # type: ignore[arg-type]
        m_hat = torch._foreach_div(self.exp_avg, self.bias1)
        denom = torch._foreach_div(self.v, self.bias2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, 1e-8)
        direction = torch._foreach_div(m_hat, denom)
        for i, g in enumerate(grads):
            blocks = stack_of(i, g)  # type: ignore[arg-type]
            for dim, factor in enumerate(self.factors[i]):
                unfolded = self.kernels._unfold(blocks, dim)
                factor.baddbmm_(unfolded, unfolded.mT, beta=0.999, alpha=0.001)
        updates: list[torch.Tensor | None] = []
        singles, single_directions = [], []
        for i, p in enumerate(self.params):
            blocks = stack_of(i, m_hat[i])
            factored = (True,) * (blocks.dim() - 1)
            shampoo = self.kernels.mode_products_stack(blocks, self.roots[i], factored)
            if STACKS[i] is None:  # several blocks: a norm per block, then back in place
                d = stack_of(i, direction[i])
                norms = torch.linalg.vector_norm(shampoo.flatten(1), dim=1).add_(1e-30)
                scale = torch.linalg.vector_norm(d.flatten(1), dim=1).div_(norms)
                out = torch.empty_like(p)
                out.view(64, 4, 128).transpose(0, 1).copy_(shampoo * scale.view(-1, 1, 1))
                updates.append(out)
            else:
                singles.append(shampoo.reshape(p.shape))
                single_directions.append(direction[i])
                updates.append(None)
        norms = torch._foreach_norm(singles)
        torch._foreach_add_(norms, 1e-30)
        scales = torch._foreach_div(torch._foreach_norm(single_directions), norms)
        scaled = iter(torch._foreach_mul(singles, scales))
        steps = [u if u is not None else next(scaled) for u in updates]
        torch._foreach_add_(self.params, steps, alpha=-1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, default=None, help="another checkout")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = digits_cnn()
    gen = torch.Generator().manual_seed(0)
    model(torch.randn(64, 1, 8, 8, generator=gen)).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    def params() -> list[torch.Tensor]:
        out = [p.detach().clone() for p in model.parameters()]
        for p, g in zip(out, grads):
            p.grad = g
        return out

    packages = {"this checkout": load_package(ROOT, "torch_shampoo_new")}
    if args.compare is not None:
        packages["other"] = load_package(args.compare.resolve(), "torch_shampoo_old")
    shampoos: dict[str, Any] = {
        label: package.Shampoo(params(), lr=1e-3, block_size=128,
                               precondition_frequency=FREQUENCY, async_roots=False)
        for label, package in packages.items()
    }  # fmt: skip
    kernels = importlib.import_module("torch_shampoo_new.kernels")
    steps: dict[str, Callable[[], object]] = {"floor": Floor(params(), kernels).step}
    steps.update({label: opt.step for label, opt in shampoos.items()})
    steps["adam"] = torch.optim.Adam(params(), lr=1e-3, foreach=False).step
    times: dict[str, list[float]] = {k: [] for k in steps}
    print(f"load average {os.getloadavg()}, 1 thread, {args.steps} steps after 3 cycles")
    for t in range(1, 3 * FREQUENCY + args.steps + 1):
        keys = list(steps) if t % 2 else list(steps)[::-1]
        for key in keys:
            begin = time.perf_counter()
            steps[key]()
            seconds = time.perf_counter() - begin
            # Shampoo's root steps (t % FREQUENCY == 0) are left out: the floor has none
            if t > 3 * FREQUENCY and (key not in shampoos or t % FREQUENCY):
                times[key].append(seconds)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for key, ms in medians.items():
        others = [other for other in medians if other != key]
        ratios = "  ".join(f"{ms / medians[other]:.3f}x {other}" for other in others)
        print(f"{key:14s} {ms:7.3f} ms   {ratios}")
    for opt in shampoos.values():
        opt.close()


if __name__ == "__main__":
    main()

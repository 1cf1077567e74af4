"""Quickstart: Shampoo (or SOAP) is a drop-in replacement for Adam (tiny regression, seconds).

The lines between the quickstart markers are the README's quickstart, verbatim
(tests/test_docs.py checks it)."""

from __future__ import annotations

import argparse

import torch
from torch import nn

import torch_shampoo


def main(argv: list[str] | None = None) -> list[float]:
    """Fit y = sin(x @ w) with a small MLP; returns the loss at every step."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optimizer", choices=("shampoo", "soap"), default="shampoo")
    args = parser.parse_args(argv)
    Optimizer = torch_shampoo.SOAP if args.optimizer == "soap" else torch_shampoo.Shampoo
    steps, lr = args.steps, args.lr
    # quickstart: begin
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = Optimizer(model.parameters(), lr=lr)  # was: torch.optim.Adam(model.parameters(), lr=lr)
    opt.plan(model=model)  # optional: prints what its state will hold, what its roots will cost
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.5f}")
    opt.close()  # stops the background threads that compute inverse roots
    # quickstart: end
    return losses


if __name__ == "__main__":
    main()

"""Fit a small tanh MLP to a teacher network whose inputs arrive on badly scaled axes (no download).

The inputs x = z·s have standard-normal z and per-feature scales s from 1 down to 1/``condition``;
the target is a fixed random teacher network of z plus a little noise, so the student must learn
large weights on the small-scale inputs: an ill-conditioned least-squares problem of the kind
preconditioned methods are built for. SGD with momentum, Adam, Shampoo and NG+ train the same
model from the same initialization on the same batches; the loss is the mean squared error.

    python examples/train_regression.py        # ~15 seconds on an idle 2-core CPU
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from _common import Batch, RunResult, Task, comparison_parser, run_comparison
from torch import Tensor, nn

DEFAULT_LRS = {"sgd": 0.1, "adam": 3e-2, "adamw": 3e-2, "shampoo": 1e-2, "ngplus": 3e-3}
NGPLUS_DAMPING = None  # the library's default
DEFAULT_STEPS = 300
METHODS = ("sgd", "adam", "shampoo-sync", "shampoo-async", "soap", "ngplus", "ngplus-ps")


def regression_loss(out: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the batch."""
    return F.mse_loss(out, target)


def build_model(features: int, hidden: int) -> nn.Module:
    """Two tanh hidden layers and a linear output."""
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 1),
    )


def build_task(
    batch: int = 64,
    features: int = 16,
    hidden: int = 64,
    condition: float = 100.0,
    train_size: int = 4096,
    test_size: int = 1024,
) -> Task:
    """The regression task: fixed data from seed 0, shuffled mini-batch epochs, one test batch."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(0.0, -torch.log10(torch.tensor(condition)).item(), features)
    teacher_in = torch.randn(features, 8, generator=gen) / features**0.5
    teacher_out = torch.randn(8, 1, generator=gen) / 8**0.5

    def sample(n: int) -> tuple[Tensor, Tensor]:
        z = torch.randn(n, features, generator=gen)
        y = torch.tanh(z @ teacher_in * 2.0) @ teacher_out
        return z * scales, y + 0.01 * torch.randn(n, 1, generator=gen)

    x_train, y_train = sample(train_size)
    x_test, y_test = sample(test_size)

    def batches(seed: int) -> Iterator[Batch]:
        order_gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(train_size, generator=order_gen)
            for i in range(0, train_size - batch + 1, batch):
                idx = order[i : i + batch]
                yield x_train[idx], y_train[idx]

    return Task(
        "regression",
        lambda: build_model(features, hidden),
        batches,
        [(x_test, y_test)],
        eval_name="test",
        loss=regression_loss,
        classification=False,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = comparison_parser(
        __doc__,
        steps=DEFAULT_STEPS,
        lrs=DEFAULT_LRS,
        ngplus_damping=NGPLUS_DAMPING,
        out="outputs/regression.png",
    )
    parser.add_argument("--batch", type=int, default=64, help="samples per step")
    parser.add_argument("--condition", type=float, default=100.0, help="largest / smallest scale")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Compare optimizers on the regression task; returns the per-method results."""
    args = parse_args(argv)
    task = build_task(args.batch, condition=args.condition)
    title = (
        f"teacher regression: condition={args.condition:g}, batch={args.batch}, seed={args.seed}"
    )
    return run_comparison(args, task, METHODS, show_accuracy=False, title=title)


if __name__ == "__main__":
    main()

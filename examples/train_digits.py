"""Train a small CNN on scikit-learn's bundled 8x8 handwritten digits (no download).

SGD with momentum, Adam, AdamW and Shampoo (synchronous and asynchronous inverse roots) train the
same model from the same initialization on the same batches; NG+ joins automatically when
torch_shampoo has it. A fixed 20% of the 1797 images is held out as the test set.

    python examples/train_digits.py            # ~25 seconds on an idle 2-core CPU
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from _common import Batch, RunResult, Task, comparison_parser, run_comparison
from sklearn.datasets import load_digits
from torch import nn

TEST_FRACTION = 0.2
DEFAULT_LRS = {"sgd": 0.1, "adam": 2e-2, "adamw": 2e-2, "shampoo": 2e-2, "ngplus": 3e-3}
NGPLUS_DAMPING = None  # the library's default
DEFAULT_STEPS = 150
METHODS = ("sgd", "adam", "adamw", "shampoo-sync", "shampoo-async", "soap", "ngplus", "ngplus-ps")


def build_model(channels: int = 16, hidden: int = 64) -> nn.Module:
    """Two 3x3 conv layers, one 2x2 max-pool and a two-layer classifier head."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def build_task(batch: int = 64, channels: int = 16, hidden: int = 64) -> Task:
    """The digits task: shuffled mini-batch epochs over the train split, one test batch."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(len(labels) * TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    x_train, y_train = images[train], labels[train]

    def batches(seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(y_train), generator=gen)
            for i in range(0, len(order) - batch + 1, batch):
                idx = order[i : i + batch]
                yield x_train[idx], y_train[idx]

    return Task(
        "digits",
        lambda: build_model(channels, hidden),
        batches,
        [(images[test], labels[test])],
        eval_name="test",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = comparison_parser(
        __doc__,
        steps=DEFAULT_STEPS,
        lrs=DEFAULT_LRS,
        ngplus_damping=NGPLUS_DAMPING,
        out="outputs/digits.png",
    )
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--channels", type=int, default=16, help="first conv layer's channels")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the head")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Compare optimizers on the digits CNN; returns the per-method results."""
    args = parse_args(argv)
    task = build_task(args.batch, args.channels, args.hidden)
    title = f"digits CNN: channels={args.channels}, batch={args.batch}, seed={args.seed}"
    return run_comparison(args, task, METHODS, show_accuracy=True, title=title)


if __name__ == "__main__":
    main()

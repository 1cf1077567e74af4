"""optimizer.step() time of synchronous Shampoo on small and medium models, relative to Adam,
for comparing two versions of the package side by side: ``--compare OTHER_CHECKOUT`` imports
both packages into one process and interleaves their steps (and Adam's) step by step, then
prints new/old ratios (medians over rounds).

Per model: median non-root step and mean step over whole precondition cycles (frequency 10,
roots computed synchronously, so their cost is in the mean; ``--async-roots``: the default,
roots on a worker thread, so the mean is the training thread's cost), both against torch.optim.Adam
(foreach=False, the CPU default) timed in the same process, interleaved; and the optimizer state
bytes against Adam's. 1 intra-op thread unless --threads.

    python benchmarks/bucket_ab.py                       # this checkout only
    python benchmarks/bucket_ab.py --compare ../baseline --rounds 3
    python benchmarks/bucket_ab.py --compact      # compact_state=True against full matrices
    python benchmarks/bucket_ab.py --models b1024 --compact --compare ../baseline  # both compact
    python benchmarks/bucket_ab.py --async-roots  # the default async roots instead
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
FREQUENCY = 10


def models() -> dict[str, tuple[nn.Module, tuple[int, ...], int]]:
    """name -> (model, input shape without batch, block size)."""
    torch.manual_seed(0)
    digits = nn.Sequential(  # examples/train_digits.py's model
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    many = nn.Sequential(*[m for _ in range(100) for m in (nn.Linear(64, 64), nn.Tanh())])
    mlp = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512)
    )
    tiles = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    return {
        "digits CNN b128": (digits, (1, 8, 8), 128),
        "100x Linear(64,64) b128": (many, (64,), 128),
        "MLP 512-1024-1024-512 b128": (mlp, (512,), 128),
        "MLP 256-256-256 b8": (tiles, (256,), 8),
        "MLP 512-1024-1024-512 b1024": (mlp, (512,), 1024),
    }


MODELS = {"digits": 0, "many": 1, "mlp": 2, "b8": 3, "b1024": 4}
"""--models keys: the index of each model in :func:`models`."""
DEFAULT_MODELS = "digits,many,mlp,b8"


def grads(model: nn.Module, shape: tuple[int, ...]) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(64, *shape, generator=gen))
        out.square().mean().backward()
        sets.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    return sets


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0

    def visit(v: object) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    for s in opt.state.values():
        visit(s)
    return total


def load_package(root: Path, name: str) -> Any:
    """The ``torch_shampoo`` package of the checkout ``root`` imported as module ``name`` (a
    copy under a temporary directory: the package imports itself relatively), so that two
    versions step side by side in one process."""
    import importlib
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="bucket_ab_"))
    shutil.copytree(root / "torch_shampoo", where / name)
    sys.path.insert(0, str(where))
    return importlib.import_module(name)


def run(
    steps: int,
    packages: dict[str, tuple[Any, dict[str, Any]]],
    async_roots: bool = False,
    chosen: str = DEFAULT_MODELS,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per model (``chosen``: --models keys) and contender (a package and extra Shampoo
    kwargs): Shampoo's steps interleaved with every other contender's (Adam, and each other
    one), the order alternating per step."""
    out: dict[str, dict[str, dict[str, float]]] = {label: {} for label in packages}
    every = list(models().items())
    for name, (model, shape, block) in [every[MODELS[k]] for k in chosen.split(",")]:
        sets = grads(model, shape)
        params = {k: [p.detach().clone() for p in model.parameters()] for k in [*packages, "adam"]}
        opts: dict[str, torch.optim.Optimizer] = {
            label: package.Shampoo(
                params[label], lr=1e-3, block_size=block, precondition_frequency=FREQUENCY,
                async_roots=async_roots, **extra,
            )
            for label, (package, extra) in packages.items()
        }  # fmt: skip
        opts["adam"] = torch.optim.Adam(params["adam"], lr=1e-3, foreach=False)
        keys = list(opts)
        times: dict[str, list[tuple[int, float]]] = {k: [] for k in opts}
        total = 2 * FREQUENCY + FREQUENCY * max(1, steps // FREQUENCY)
        for t in range(1, total + 1):
            for key in keys if t % 2 else keys[::-1]:
                for p, g in zip(params[key], sets[t % len(sets)]):
                    p.grad = g
                begin = time.perf_counter()
                opts[key].step()
                times[key].append((t, time.perf_counter() - begin))
        timed = {k: [(t, s) for t, s in v if t > 2 * FREQUENCY] for k, v in times.items()}
        adam = statistics.median(s for _, s in timed["adam"])
        for label in packages:
            nonroot = statistics.median(s for t, s in timed[label] if t % FREQUENCY)
            mean = statistics.fmean(s for _, s in timed[label])
            out[label][name] = {
                "adam_ms": adam * 1e3,
                "nonroot_ms": nonroot * 1e3,
                "mean_ms": mean * 1e3,
                "nonroot_vs_adam": nonroot / adam,
                "mean_vs_adam": mean / adam,
                "state_vs_adam": state_bytes(opts[label]) / state_bytes(opts["adam"]),
            }
            opts[label].close()  # type: ignore[attr-defined]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout")
    parser.add_argument(
        "--compact",
        action="store_true",
        help="compact_state=True against full matrices (with --compare: compact state in both "
        "checkouts)",
    )
    parser.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"comma-separated subset of {', '.join(MODELS)} (b1024: the MLP at block 1024)",
    )
    parser.add_argument(
        "--async-roots",
        action="store_true",
        help="the default asynchronous roots (staleness 'auto'): the root work runs on a "
        "worker thread, so the mean step is what the training thread pays",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    package = load_package(ROOT, "torch_shampoo_new")
    packages: dict[str, tuple[Any, dict[str, Any]]] = {"new": (package, {})}
    if args.compare is not None:
        packages["old"] = (load_package(args.compare.resolve(), "torch_shampoo_old"), {})
    if unknown := set(args.models.split(",")) - set(MODELS):
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    compact = {"compact_state": True}
    if args.compact and args.compare is not None:  # compact state, old and new
        packages = {label: (p, compact) for label, (p, _) in packages.items()}
    elif args.compact:  # "old": full matrices, "new": compact state, both of this checkout
        packages = {"new": (package, compact), "old": (package, {})}
    mode = "async roots" if args.async_roots else "synchronous roots"
    print(f"load average {os.getloadavg()}, threads {args.threads}, {args.steps} steps, {mode}")
    runs = [run(args.steps, packages, args.async_roots, args.models) for _ in range(args.rounds)]
    if len(packages) == 1:
        for name, r in runs[0]["new"].items():
            print(f"{name:28s} " + " ".join(f"{k}={v:.3g}" for k, v in r.items()))
        return
    full_vs_compact = args.compact and args.compare is None
    old_label, new_label = ("full", "compact") if full_vs_compact else ("old", "new")
    for name in runs[0]["new"]:
        print(name)
        for key in runs[0]["new"][name]:
            old = statistics.median(r["old"][name][key] for r in runs)
            new = statistics.median(r["new"][name][key] for r in runs)
            print(
                f"  {key:16s} {old_label} {old:9.3f}  {new_label} {new:9.3f}  "
                f"{new_label}/{old_label} {new / old:6.3f}"
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

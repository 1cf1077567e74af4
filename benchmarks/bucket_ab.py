"""optimizer.step() time of synchronous Shampoo on small and medium models, relative to Adam,
for comparing two versions of the package side by side (run this file from each checkout, in
alternation; ``--compare OTHER_CHECKOUT`` does that and prints new/old ratios).

Per model: median non-root step and mean step over whole precondition cycles (frequency 10,
roots computed synchronously, so their cost is in the mean), both against torch.optim.Adam
(foreach=False, the CPU default) timed in the same process, interleaved; and the optimizer state
bytes against Adam's. 1 intra-op thread unless --threads.

    python benchmarks/bucket_ab.py                       # this checkout only
    python benchmarks/bucket_ab.py --compare ../baseline --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
    }


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


def run_one(steps: int) -> dict[str, dict[str, float]]:
    sys.path.insert(0, str(ROOT))
    from torch_shampoo import Shampoo

    out = {}
    for name, (model, shape, block) in models().items():
        sets = grads(model, shape)
        shampoo_params = [p.detach().clone() for p in model.parameters()]
        adam_params = [p.detach().clone() for p in model.parameters()]
        opts = {
            "shampoo": Shampoo(
                shampoo_params, lr=1e-3, block_size=block, precondition_frequency=FREQUENCY,
                async_roots=False,
            ),
            "adam": torch.optim.Adam(adam_params, lr=1e-3, foreach=False),
        }  # fmt: skip
        params = {"shampoo": shampoo_params, "adam": adam_params}
        times: dict[str, list[tuple[int, float]]] = {k: [] for k in opts}
        total = 2 * FREQUENCY + FREQUENCY * max(1, steps // FREQUENCY)
        for t in range(1, total + 1):
            for key in ("adam", "shampoo") if t % 2 else ("shampoo", "adam"):
                for p, g in zip(params[key], sets[t % len(sets)]):
                    p.grad = g
                begin = time.perf_counter()
                opts[key].step()
                times[key].append((t, time.perf_counter() - begin))
        timed = {k: [(t, s) for t, s in v if t > 2 * FREQUENCY] for k, v in times.items()}
        adam = statistics.median(s for _, s in timed["adam"])
        nonroot = statistics.median(s for t, s in timed["shampoo"] if t % FREQUENCY)
        mean = statistics.fmean(s for _, s in timed["shampoo"])
        out[name] = {
            "adam_ms": adam * 1e3,
            "nonroot_ms": nonroot * 1e3,
            "mean_ms": mean * 1e3,
            "nonroot_vs_adam": nonroot / adam,
            "mean_vs_adam": mean / adam,
            "state_vs_adam": state_bytes(opts["shampoo"]) / state_bytes(opts["adam"]),
        }
        opts["shampoo"].close()  # type: ignore[attr-defined]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one or args.compare is None:
        result = run_one(args.steps)
        if args.one:
            print(json.dumps(result))
            return
        for name, r in result.items():
            print(f"{name:28s} " + " ".join(f"{k}={v:.3g}" for k, v in r.items()))
        return
    print(f"load average {os.getloadavg()}, threads {args.threads}, {args.steps} steps")
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label, root in (("old", args.compare), ("new", ROOT)):
            script = Path(root) / "benchmarks" / "bucket_ab.py"
            if not script.exists():
                script.write_text(Path(__file__).read_text())
            command = [sys.executable, str(script), "--one", "--steps", str(args.steps)]
            command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for name in runs["new"][0]:
        print(name)
        for key in runs["new"][0][name]:
            old = statistics.median(r[name][key] for r in runs["old"])
            new = statistics.median(r[name][key] for r in runs["new"])
            print(f"  {key:16s} old {old:9.3f}  new {new:9.3f}  new/old {new / old:6.3f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

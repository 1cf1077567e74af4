"""Peak memory of Shampoo's first steps (when the state is created and stacked into buckets)
against the state it leaves, with full matrices and with ``compact_state=True``.

Each configuration runs in a fresh process (the peak is the process's ``ru_maxrss``, which
never goes down): 3 × Linear(d, d) with random gradients, two synchronous steps at block 128.
CPU only (on CUDA, ``torch.cuda.max_memory_allocated`` would be the figure).

    python benchmarks/first_step_memory.py            # d = 2048
    python benchmarks/first_step_memory.py --width 1024
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import gc, resource, sys, torch
sys.path.insert(0, {root!r})
import torch_shampoo
torch.manual_seed(0)
d = {width}
model = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(3)])
for p in model.parameters():
    p.grad = torch.randn_like(p)
opt = torch_shampoo.Shampoo(
    model.parameters(), block_size=128, async_roots=False, compact_state={compact}
)
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
opt.step()
opt.step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, opt.root_stats()["state_bytes"])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    print(f"3 x Linear({args.width}, {args.width}), block 128, load average {os.getloadavg()}")
    for compact in (False, True):
        code = CHILD.format(root=str(ROOT), width=args.width, compact=compact)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        peak, state = (int(x) for x in out.stdout.split())
        label = "compact_state" if compact else "full matrices"
        print(
            f"{label:14s} peak rise {peak / 2**20:7.0f} MB   state {state / 2**20:6.0f} MB   "
            f"peak / state {peak / state:5.2f}"
        )


if __name__ == "__main__":
    main()

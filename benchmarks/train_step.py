"""Whole training steps (zero_grad, forward, backward, step) of the demos' models.

Each contender trains its own copy of the demo's model (same initialization) on its own stream of
the demo's batches at the demo's default lr (Adam's for SOAP), with the library's defaults
(async roots, "auto" staleness); the contenders run interleaved (benchmarks/harness.py). Per
demo: the full step and the ``optimizer.step()`` inside it, ratios to Adam and Shampoo async,
and the first step apart (state creation; HeavyBall's compilation). ``--compare PATH_OR_REV``
adds the other checkout's Shampoo and SOAP.

    python -m benchmarks.train_step --quick
    python -m benchmarks.train_step --demos charlm --compare ../baseline
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import harness as h

KEYS = ("adam", "shampoo-async", "shampoo-sync", "soap-async", "soap-sync", "ngplus",
        "pto-soap", "hb-soap")  # fmt: skip


def contender(task: Any, lrs: dict[str, float], key: str, label: str, pkg: Any) -> h.Contender:
    torch.manual_seed(0)
    model = task.build_model()
    group = {"shampoo-": "shampoo", "ngplus": "ngplus"}
    lr = next((lrs[g] for prefix, g in group.items() if key.startswith(prefix)), lrs["adam"])
    opt = h.optimizer(key, model.parameters(), lr=lr, pkg=pkg)
    batches = task.batches(0)

    def step() -> float:
        x, y = next(batches)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        began = time.perf_counter()
        opt.step()
        return time.perf_counter() - began

    return h.Contender(label + h.LABELS.get(key, key), step, opt=opt) if opt else None  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__)
    p.add_argument("--demos", default="digits,charlm,regression")
    p.add_argument("--steps", type=int, default=None, help="timed steps per block (40; quick 10)")
    args = p.parse_args(argv)
    report = h.Report("train_step", args)
    pkgs = h.packages(args)
    steps = args.steps or (10 if args.quick else 40)
    rounds = args.rounds or (1 if args.quick else 3)
    for demo in args.demos.split(","):
        task, module = h.task(demo, args.quick)
        cs = []
        # --quick: no HeavyBall (it compiles for minutes; step_time's --quick has it)
        for key in [k for k in KEYS if not (args.quick and k == "hb-soap")]:
            ab = key.startswith(("shampoo", "soap"))
            for label, pkg in pkgs.items() if ab else [("", h.torch_shampoo)]:
                c = contender(task, module.DEFAULT_LRS, key, label, pkg)
                if c is not None:
                    cs.append(c)
        wall, rows, first = h.run(cs, rounds, steps, 5 if args.quick else 20, demo)
        adam = rows[0]
        base = next(r for r in rows if r["name"] == "shampoo-async")
        table = [[
            r["name"], h.ms(r["median"]), h.ms(r["mean"]), h.ms(r["inner_median"]),
            h.ms(r["inner_mean"]), h.ratio(r["mean"], adam["mean"]),
            h.ratio(r["mean"], base["mean"]), r.get("root_stats", {}).get("stalls", "-"),
            f"{first[r['name']]:.2f}",
        ] for r in rows]  # fmt: skip
        report.section(
            f"{demo}: whole training step", ["contender", "med ms", "mean ms", "step() med",
            "step() mean", "mean/Adam", "mean/Shampoo async", "stalls", "first s"], table,
            f"{rounds} rounds x {steps} timed steps, {wall:.0f} s; threads "
            f"{torch.get_num_threads()}", {"rows": rows, "first_seconds": first},
        )  # fmt: skip
    report.finish()


if __name__ == "__main__":
    main()

"""Optimizer memory: state bytes by method and their ratio to Adam; the peak of the first steps.

The state is measured ONE way for every optimizer: ``harness.state_bytes``. Sections:

  state  per model (and the char-LM demo's), after 2 precondition cycles of fixed gradients
         (roots computed): state MB, ratio to Adam, bytes per element (Adam's float32 moments:
         8); ``bf16``: ``state_dtype=torch.bfloat16`` (``bf16full``: ``compact_state=False``,
         ``bf16compact``: ``True``);
         torch_shampoo's host buffers of roots (most and mean of ``root_stats()``); on --device
         cuda the steps' peak allocated.
         ``--compare PATH_OR_REV`` adds the other checkout's rows.
  peak   each configuration in a fresh process: the rise of the peak (RSS, VmHWM, reset just
         before; on --device cuda ``torch.cuda.max_memory_allocated``) over the first two steps
         of 3 x Linear(d, d) (state creation, stacking, first roots) against the state left.

    python -m benchmarks.memory --quick
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import subprocess
import sys
from typing import Any

import torch

from . import harness as h

KEYS = ("adam", "shampoo-sync", "shampoo-compact", "shampoo-bf16", "shampoo-bf16full",
        "shampoo-bf16compact", "shampoo-async", "soap-sync", "soap-bf16", "ngplus", "pto-soap",
        "hb-soap")  # fmt: skip
PEAK = ("adam", "shampoo-sync", "shampoo-compact", "shampoo-bf16", "shampoo-bf16full",
        "shampoo-bf16compact", "soap-sync", "soap-bf16", "ngplus")  # fmt: skip
FREQUENCY = 10


def _takes_state_dtype(pkg: Any) -> bool:
    return "state_dtype" in pkg.Shampoo.__init__.__code__.co_varnames


def state(report: h.Report, args: Any, pkgs: dict[str, Any]) -> None:
    blocks, cuda = (64, 128) if args.quick else (128, 1024), args.device == "cuda"
    for model in [*h.models(args.quick), *([] if args.quick else [h.charlm()])]:
        net, sets = h.gradient_sets(model, 2, args.device)
        elements = sum(p.numel() for p in net.parameters())
        rows, data, adam = [], [], 0
        # --quick: no HeavyBall (it compiles for minutes; step_time's --quick has it)
        for key in [k for k in KEYS if not (args.quick and k == "hb-soap")]:
            tuned = key.startswith(("shampoo", "soap", "ngplus"))
            for label, pkg in pkgs.items() if tuned else [("", None)]:
                # bf16 (state_dtype): not in a --compare checkout from before it existed
                if label and key.endswith("bf16") and not _takes_state_dtype(pkg):
                    continue
                for block in blocks if key.startswith(("shampoo", "soap")) else [None]:
                    params, before = h.replica(net, sets)
                    f = "inverse_frequency" if key == "ngplus" else "precondition_frequency"
                    kw: dict[str, Any] = {"block": block, "pkg": pkg, f: FREQUENCY} if tuned else {}
                    opt = h.optimizer(key, params, **kw)
                    if opt is None:
                        continue
                    gc.collect()  # (the previous contender's memory freed, lazy state not made)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated() if cuda else 0
                    host = []
                    for t in range(2 * FREQUENCY + 1):
                        before(t)
                        opt.step()
                        host += [opt.root_stats()["host_buffer_bytes"]] if tuned else []
                    peak = torch.cuda.max_memory_allocated() - base if cuda else None
                    held = h.state_bytes(opt)
                    h.drain(opt)
                    h.close(opt)
                    adam = adam or held
                    name = label + h.LABELS.get(key, key) + (f" b{block}" if block else "")
                    most, mean = (max(host), statistics.fmean(host)) if host else (None, None)
                    rows.append([name, h.mb(held), h.ratio(held, adam), f"{held / elements:.1f}",
                                 f"{h.mb(most)} / {h.mb(mean)}", h.mb(peak)])  # fmt: skip
                    data.append({"name": name, "state_bytes": held, "host_buffer_bytes": most,
                                 "host_buffer_mean": mean, "cuda_peak": peak})  # fmt: skip
        report.section(
            f"state: {model.name}, {elements / 1e6:.2f} M params ({args.device})",
            ["optimizer", "state MB", "/Adam", "bytes/element", "host MB max/mean", "CUDA peak MB"],
            rows, f"after {2 * FREQUENCY + 1} steps (frequency {FREQUENCY})", data)  # fmt: skip


def child(key: str, width: int, device: str) -> None:
    """One peak measurement, printed as JSON (run in a fresh process by ``peak``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(3)]).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = h.optimizer(key, model.parameters(), block=128 if key != "adam" else None)
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: reset the peak RSS (VmHWM) to the current RSS, so earlier peaks hide nothing
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def high(now: bool = False) -> int:
        if cuda:
            return torch.cuda.memory_allocated() if now else torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as f:  # (Linux)
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    base = high(now=True)
    opt.step()
    opt.step()
    peak = high()
    print(json.dumps({"peak_rise": peak - base, "state_bytes": h.state_bytes(opt)}))
    h.close(opt)


def peak(report: h.Report, args: Any) -> None:
    width = 512 if args.quick else 2048
    rows, data = [], {}
    for key in PEAK:
        run = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", "--child", key, str(width), args.device],
            cwd=h.ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode:
            raise SystemExit(f"peak {key}: {run.stderr}")
        r = data[key] = json.loads(run.stdout.splitlines()[-1])
        rows.append([h.LABELS.get(key, key), h.mb(r["peak_rise"]), h.mb(r["state_bytes"]),
                     h.ratio(r["peak_rise"], r["state_bytes"])])  # fmt: skip
    report.section(
        f"peak: 3 x Linear({width}, {width}), block 128, first two steps ({args.device})",
        ["optimizer", "peak rise MB", "state MB", "peak / state"], rows,
        "peak rise: VmHWM (CPU) or max_memory_allocated (CUDA) after the two steps minus "
        "before them; a fresh process each", data,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    p = h.parser(__doc__, rounds=False, sections="state,peak", device=True)
    args = p.parse_args(argv)
    report = h.Report("memory", args)
    if "state" in args.sections:
        state(report, args, h.packages(args))
    if "peak" in args.sections:
        peak(report, args)
    report.finish()


if __name__ == "__main__":
    main()

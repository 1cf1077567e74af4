"""Inverse roots: the solve per method, size, conditioning and thread count; async roots' staleness;
warm-started roots. Sections:

  solve      X = (A + εI)^(-1/p) by ``torch_shampoo.roots.matrix_roots.inverse_root`` (eigh, newton;
             cholesky for p = 1; "f64" / "f32": ``inverse_roots`` of the matrix in float64 / in
             float32, "(retried)" when it fell back to float64; --sizes to choose the sizes)
             against a raw float64 ``torch.linalg.eigh`` of the same matrix (interleaved
             medians), at each of --thread-counts (1 and all; quick: 1). Accuracy:
             the relative backward error ‖X^(-p) - B‖_F / ‖B‖_F (B = A + εI); "floor"
             u(1 + p κ^(1/p)) is the best any float64 root can reach.
  staleness  async Shampoo with a fixed "model compute" (time.sleep S before every step, standing
             for a forward/backward on an accelerator while the CPU is free) against sync Shampoo
             whose only roots are at step 1, same sleep; S = --coverage x the root work per
             cycle (a sync root step's median minus a non-root one's) / frequency. Per block
             size: step medians/means/max, stalls, the staleness "auto" fitted, the root window.
  warm       sync Shampoo at frequency 2, eigh_every 1 (every root the pool's exact root) against
             5 (warm-started roots): root seconds per cycle, also split by kind. --device cuda:
             the models and warm roots on the GPU (exact roots on the CPU pool as ever; the
             other sections stay on the CPU).

    python -m benchmarks.roots --quick
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any

import torch

from torch_shampoo.roots.matrix_roots import inverse_root, inverse_roots
from torch_shampoo.update import kernels

from . import harness as h

EPSILON = 1e-12
FREQUENCY = 10


def test_matrix(n: int, condition: float, seed: int) -> torch.Tensor:
    """A = Q diag(d) Qᵀ, Q Haar-orthogonal, d geometric from 1 down to 1/condition."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    q = q * torch.sign(torch.diagonal(r))
    a = (q * torch.logspace(0.0, -math.log10(condition), n, dtype=torch.float64)) @ q.mT
    return 0.5 * (a + a.mT)


def backward_error(root: torch.Tensor, b: torch.Tensor, p: int) -> float:
    if not bool(torch.isfinite(root).all()):
        return math.inf
    mu, v = torch.linalg.eigh(root)
    if not mu[0] > 0:
        return math.inf
    power = (v * mu.pow(-float(p))) @ v.mT
    return float(torch.linalg.matrix_norm(power - b) / torch.linalg.matrix_norm(b))


def warm_step(bases: torch.Tensor, factors: torch.Tensor, p: int) -> Any:
    """What a warm root step computes per factor (``eigh_every`` > 1): update.warm's kernels."""
    return kernels.eigen_roots(
        kernels.power_step(bases, factors), factors, 1.0, p, EPSILON, False, drift=False
    )


def solve(report: h.Report, args: Any) -> None:
    sizes: tuple[int, ...] = (64, 128, 256) if args.quick else (64, 128, 256, 512, 1024, 2048)
    sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else sizes
    conditions = (1e2, 1e10) if args.quick else (1e2, 1e6, 1e10)
    for threads in [int(t) for t in args.thread_counts.split(",")]:
        torch.set_num_threads(threads)
        rows, data = [], []
        for n in sizes:
            for cond in conditions:
                for p in (1, 4):
                    a = test_matrix(n, cond, seed=n)
                    b = a + EPSILON * torch.eye(n, dtype=a.dtype)
                    methods = ["eigh", "newton"] + (["cholesky"] if p == 1 else [])
                    methods = [m for m in methods if m in args.solve_methods.split(",")]
                    cs = [h.Contender("raw eigh", functools.partial(torch.linalg.eigh, a))]
                    cs += [h.Contender(m, functools.partial(inverse_root, a, p, EPSILON, m))
                           for m in methods]  # fmt: skip
                    f32 = functools.partial(inverse_roots, a[None], p, EPSILON, dtype=torch.float32)
                    f64 = functools.partial(inverse_roots, a[None], p, EPSILON)  # (the pool's)
                    cs += [h.Contender("f32", f32), h.Contender("f64", f64)]
                    for dt in (torch.float64, torch.float32):  # a warm root step (eigh_every)
                        q, f = torch.linalg.eigh(a)[1][None].to(dt), a[None].to(dt)
                        cs.append(h.Contender(f"warm {dt}", functools.partial(
                            warm_step, q, f, p)))  # fmt: skip
                    repeats = 3 if args.quick or n >= 512 else 5
                    rs = h.interleave(cs, repeats, 1, 1, f"solve {threads} threads n={n}")
                    med = {r["name"]: r["median"] for r in rs}
                    row = [n, f"{cond:.0e}", p, f"{2.0**-53 * (1 + p * cond ** (1 / p)):.1e}",
                           h.ms(med["raw eigh"])]  # fmt: skip
                    for m in ("eigh", "newton", "cholesky"):
                        if m not in med:
                            row += ["-", "-", "-"]
                            continue
                        result = inverse_root(a, p, EPSILON, m)
                        err = backward_error(result.root, b, p)
                        row += [h.ms(med[m]), h.ratio(med[m], med["raw eigh"]),
                                f"{err:.1e}" + ("" if result.ok else " (not ok)")]  # fmt: skip
                    (result,) = f32()
                    err = backward_error(result.root, b, p)
                    row += [h.ms(med["f64"]), h.ms(med["f32"]), h.ratio(med["f32"], med["f64"]),
                            f"{err:.1e}" + (" (retried)" if result.retried else ""),
                            h.ratio(med["warm torch.float64"], med["f64"]),
                            h.ratio(med["warm torch.float32"], med["f64"])]  # fmt: skip
                    rows.append(row)
                    data.append({"n": n, "condition": cond, "p": p, "medians": med,
                                 "f32_retried": result.retried})  # fmt: skip
        report.section(
            f"solve: {threads} threads", ["n", "cond", "p", "floor", "raw eigh ms", "eigh ms",
            "/raw", "err", "newton ms", "/raw", "err", "cholesky ms", "/raw", "err", "f64 ms",
            "f32 ms", "f32/f64", "err", "warm/f64", "warm f32/f64"], rows,
            f"ε = {EPSILON:g}; medians of interleaved repeats; f64 / f32: inverse_roots of the one "
            "matrix in float64 / float32 (κ > 0.1/u32 or not finite: solved again in float64); "
            "warm: a warm root step from its eigenbasis (power step, Rayleigh quotients, root) "
            "in float64 / float32, on the calling thread",
            data,
        )  # fmt: skip


def staleness(report: h.Report, args: Any) -> None:
    torch.set_num_threads(1)
    model = h.models(args.quick)[0]
    net, sets = h.gradient_sets(model, 4)
    blocks = (64, 128) if args.quick else (128, 1024)
    rows, data = [], []
    for block in blocks:

        def make(key: str, sleep: float, block: int = block, **kw: Any) -> h.Contender:
            params, grads = h.replica(net, sets)
            opt = h.optimizer(key, params, block=block, root_workers=1, **kw)

            def before(t: int) -> None:
                grads(t)
                time.sleep(sleep)

            return h.Contender(f"{key} b{block}", opt.step, before, opt, FREQUENCY,
                               refill=FREQUENCY if key.endswith("async") else 0)  # fmt: skip

        sync = make("shampoo-sync", 0.0, precondition_frequency=FREQUENCY)
        (s,) = h.interleave([sync], 1, 2 * FREQUENCY, FREQUENCY, f"staleness b{block} sync")
        compute = args.coverage * max(0.0, s["median_root"] - s["median_nonroot"]) / FREQUENCY
        cs = [make("shampoo-noroot", compute),
              make("shampoo-async", compute, precondition_frequency=FREQUENCY)]  # fmt: skip
        base, asyn = h.interleave(cs, args.rounds or 1, FREQUENCY * (1 if args.quick else 3),
                                  FREQUENCY, f"staleness b{block}")  # fmt: skip
        for r in (base, asyn):
            st = r["root_stats"]
            stale = st["root_staleness"] if isinstance(st["root_staleness"], int) else FREQUENCY
            rows.append([
                r["name"], f"{compute * 1e3:.1f}", h.ms(r["median"]), h.ms(r["mean"]),
                h.ms(r["max"]), h.ratio(r["max"], r["median"]), h.ratio(r["mean"], base["median"]),
                st["stalls"], f"{st['stall_seconds']:.2f}", f"{st['mean_root_seconds']:.4f}",
                st["root_staleness"], f"{st['mean_staleness']:.1f}", st["max_staleness"],
                f"{stale * (r['median'] + compute):.2f}" if r is asyn else "-",
            ])  # fmt: skip
        data.append({"sync": s, "noroot": base, "async": asyn, "compute_seconds": compute})
    report.section(
        f"staleness: {model.name}, 1 thread, root_workers=1, frequency {FREQUENCY}",
        ["contender", "sleep ms", "med ms", "mean ms", "max ms", "max/med", "mean/noroot med",
         "stalls", "stall s", "mean root s", "staleness", "mean stale", "max stale", "window s"],
        rows, f"sleep S = {args.coverage} x sync root work per cycle / {FREQUENCY}; window = "
        "staleness x (median + S): the time the pipeline has to hide a cycle's roots", data,
    )  # fmt: skip


def warm(report: h.Report, args: Any) -> None:
    torch.set_num_threads(1)
    models = [h.mlp((64, 128, 128, 64)), h.models(True)[1]] if args.quick else [
        h.charlm(), h.mlp((512, 1024, 1024, 512))]  # fmt: skip
    rows, data, cuda = [], [], args.device == "cuda"
    for model in models:
        net, sets = h.gradient_sets(model, 4, args.device)

        def make(every: int, net: Any = net, sets: Any = sets) -> h.Contender:
            params, before = h.replica(net, sets)
            opt = h.optimizer("shampoo-sync", params, block=1024, root_workers=1,
                              precondition_frequency=2, start_preconditioning_step=2,
                              eigh_every=every)  # fmt: skip
            return h.Contender(f"eigh_every={every}", opt.step, before, opt, 2, cuda=cuda)

        cs = [make(1), make(5)]
        rs = h.interleave(cs, args.rounds or (1 if args.quick else 3), 20, 2, f"warm {model.name}")
        found = []
        for c, r in zip(cs, rs):
            roots = [(t, s) for _, t, s, _ in c.records if t % 2 == 0]
            exact = [s for t, s in roots if (t // 2) % 5 == 0 or c is cs[0]]
            warm_steps = [s for t, s in roots if (t // 2) % 5 and c is cs[1]]
            cycle = statistics.fmean(s for _, s in roots) - r["median_nonroot"]
            found.append(cycle)
            rows.append([model.name, r["name"], h.ms(r["median_nonroot"]),
                         h.ms(statistics.fmean(exact) - r["median_nonroot"]),
                         h.ms(statistics.fmean(warm_steps) - r["median_nonroot"])
                         if warm_steps else "-", h.ms(cycle),
                         h.ratio(cycle, found[0])])  # fmt: skip
            data.append({"model": model.name, **r})
    report.section(
        f"warm: root seconds per cycle, sync Shampoo on {args.device}, 1 thread, root_workers=1, "
        "frequency 2",
        ["model", "contender", "non-root ms", "exact root ms", "warm root ms", "per cycle ms",
         "/ eigh_every=1"], rows,
        "root ms = a root step's time − the median non-root step's; per cycle: the mean over "
        "blocks of 10 root steps (eigh_every=5: 2 exact, 8 warm)", data,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__, compare=False, sections="solve,staleness,warm", device=True)
    p.add_argument("--thread-counts", default=None, help="solve: torch threads (1,CORES)")
    p.add_argument("--sizes", default=None, help="solve: matrix sizes (64,...,2048)")
    p.add_argument("--solve-methods", default="eigh,newton,cholesky", help="solve: methods")
    p.add_argument("--coverage", type=float, default=2.0, help="staleness: S / root work")
    args = p.parse_args(argv)
    cores = torch.get_num_threads()
    if not args.thread_counts:  # quick: 1 (2 threads of a loaded 2-core machine: seconds)
        args.thread_counts = "1" if cores == 1 or args.quick else f"1,{cores}"
    report = h.Report("roots", args)
    if "solve" in args.sections:
        solve(report, args)
    if "staleness" in args.sections:
        staleness(report, args)
    if "warm" in args.sections:
        warm(report, args)
    report.finish()


if __name__ == "__main__":
    main()

"""What docs/render.py runs and judges: ``RUNS`` (docs/results/NAME.json ← ``python -m`` these
arguments) and ``TARGETS`` (a goal beside its figure, judged in the committed results). Targets
live here, beside the figures they judge; never in benchmarks/."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SEEDED = "shampoo-sync,shampoo-async,shampoo,shampoo-async-unstaggered,shampoo-sync-stagger"
STAGGERED = "ngplus-sync,ngplus,ngplus-unstaggered,soap-sync,soap,soap-unstaggered"
QUICK = ("step_time", "train_step", "convergence", "roots", "memory", "distributed")
DEMOS = ("regression", "digits", "charlm")
RUNS: dict[str, list[str]] = {
    **{name: [f"benchmarks.{name}", "--quick"] for name in QUICK},
    # full size, for the README's table and the memory targets (minutes on 2 cores)
    # (1 torch thread: 2 threads on a loaded 2-core machine spin and ran 5-10x slower)
    "demos": ["benchmarks.convergence", "--sections", "grid", "--lr-scales", "1",
              "--methods", "adam,shampoo-async,soap,ngplus", "--threads", "1"],
    "memory_state": ["benchmarks.memory", "--sections", "state", "--threads", "1"],
    "roots_warm": ["benchmarks.roots", "--sections", "warm", "--threads", "1"],
    "roots_solve": ["benchmarks.roots", "--sections", "solve", "--thread-counts", "1", "--sizes",
                    "128,512,1024", "--solve-methods", "eigh", "--threads", "1"],
    **{f"async_{n}t": ["benchmarks.convergence", "--sections", "seeds", "--tasks", "charlm",
                       "--methods", SEEDED, "--threads", str(n)] for n in (1, 2)},
    **{f"stagger_{name}": ["benchmarks.convergence", "--sections", "seeds", "--tasks", tasks,
                           "--methods", STAGGERED, "--threads", "1"]
       for name, tasks in (("small", "regression,digits"), ("charlm", "charlm"))},
    # against 7dde2b4, main when issue 32 was filed ("other"): its sync target's "today's"
    "threads": ["benchmarks.step_time", "--sections", "threads", "--compare", "7dde2b4"],
    "storage": ["benchmarks.step_time", "--sections", "storage", "--threads", "1"],
    "bf16": ["benchmarks.convergence", "--sections", "seeds", "--tasks", ",".join(DEMOS),
             "--methods", "shampoo-sync,shampoo-sync-bf16,shampoo-sync-bf16full,shampoo-sync-bf16c",
             "--threads", "1"],
}  # fmt: skip
"""docs/results/NAME.json ← ``python -m`` these arguments (``--out`` added)."""


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A goal beside its figure: ``result`` and ``section`` (a title prefix) say where it is
    measured; ``measure`` gives (value, what) from that section, or None where it has no row."""

    text: str
    result: str
    section: str
    limit: float
    measure: Callable[[dict[str, Any]], tuple[float, str] | None]


def _least_ratio(prefix: str, suffix: str = "") -> Callable[[dict[str, Any]], Any]:
    """The least "/Adam" of a section's rows named ``prefix…suffix`` (memory's state tables)."""

    def measure(section: dict[str, Any]) -> tuple[float, str] | None:
        col = section["headers"].index("/Adam")
        rows = [r for r in section["rows"] if r[0].startswith(prefix) and r[0].endswith(suffix)]
        if not rows:
            return None
        best = min(rows, key=lambda r: float(r[col]))
        return float(best[col]), f"{best[0]}: {best[col]}× Adam's"

    return measure


def _row_ratio(row: str, base: str, header: str) -> Callable[[dict[str, Any]], Any]:
    """``header`` of the row named ``row`` over that of ``base`` (step_time's tables)."""

    def measure(section: dict[str, Any]) -> tuple[float, str] | None:
        col = section["headers"].index(header)
        found = {r[0]: float(r[col]) for r in section["rows"] if r[0] in (row, base)}
        if len(found) < 2:
            return None
        value = found[row] / found[base]
        return value, f"{row} {header} / {base}'s: {found[row]:g} / {found[base]:g} = {value:.2f}×"

    return measure


def _worst_ratio(contender: str, header: str) -> Callable[[dict[str, Any]], Any]:
    """The largest ``header`` over the rows of ``contender`` (one per model), e.g. roots' warm."""

    def measure(section: dict[str, Any]) -> tuple[float, str] | None:
        if header not in section["headers"] or "contender" not in section["headers"]:
            return None
        col, who = section["headers"].index(header), section["headers"].index("contender")
        rows = [r for r in section["rows"] if r[who] == contender]
        if not rows:
            return None
        worst = max(rows, key=lambda r: float(r[col]))
        each = ", ".join(f"{r[0]}: {r[col]}×" for r in rows)
        return float(worst[col]), f"{contender} {header}: {each}"

    return measure


def _wall_to_faster(row: str, a: str, b: str) -> Callable[[dict[str, Any]], Any]:
    """The mean wall time of the row ``row`` over the faster of rows ``a`` and ``b``'s."""

    def measure(section: dict[str, Any]) -> tuple[float, str] | None:
        col = section["headers"].index("mean wall s")
        found = {r[0]: float(r[col]) for r in section["rows"] if r[0] in (row, a, b)}
        if len(found) < 3:
            return None
        faster = min((a, b), key=found.__getitem__)
        value = found[row] / found[faster]
        return value, f"{row} {found[row]:g} s / {faster} {found[faster]:g} s = {value:.2f}×"

    return measure


TARGETS: tuple[Target, ...] = (
    Target("Shampoo's default optimizer state ≤ 2.1× Adam's on the MLP 512-1024-1024-512 at "
           "block 128", "memory_state", "state: MLP 512-1024-1024-512", 2.1,
           _least_ratio("shampoo-async", "b128")),
    Target("Shampoo's default optimizer state ≤ 2.6× Adam's on the char-LM demo's model",
           "memory_state", "state: char-LM (demo)", 2.6, _least_ratio("shampoo-async", "b128")),
    Target("`state_dtype=torch.bfloat16` (`compact_state=\"auto\"`, the default): state ≤ 1.5× "
           "Adam's on the MLP at block 128", "memory_state", "state: MLP 512-1024-1024-512", 1.5,
           _least_ratio("shampoo-bf16 ", "b128")),
    Target("warm-started roots: root seconds per cycle ≤ 0.4× those of exact roots",
           "roots_warm", "warm", 0.4, _worst_ratio("eigh_every=5", "/ eigh_every=1")),
    *(Target(f"default async Shampoo: {what} (char-LM demo, mean of 3 seeds, {n} thread"
             f"{'s' * (n > 1)})", f"async_{n}t", "seeds charlm", limit,
             _worst_ratio("Shampoo async", header))
      for n in (1, 2) for what, limit, header in (
          ("steps to Adam's loss ≤ 1.03× sync's", 1.03, "steps / base"),
          ("final loss ≤ 1.01× sync's", 1.01, "loss / base"))),
    *(Target(f"the default `async_roots=\"auto\"`: mean wall time ≤ 1.05× the faster of sync "
             f"and async roots' (char-LM demo, 3 seeds, {n} thread{'s' * (n > 1)})",
             f"async_{n}t", "seeds charlm", 1.05,
             _wall_to_faster("Shampoo", "Shampoo sync", "Shampoo async")) for n in (1, 2)),
    *(Target(f"`compact_state=True`: {what} ≤ {limit}× full matrices' (MLP, block 128, 1 thread)",
             "storage", "storage", limit, _row_ratio("shampoo-compact b128", "shampoo-sync b128",
                                                     header))
      for what, limit, header in (("the non-root step", 1.05, "med ms"),
                                  ("the amortized step", 1.0, "mean ms"))),
    Target("sync roots on every core: the sync amortized step (mean ms) at block 1024 ≤ 0.6× "
           "that of main when issue 32 was filed (7dde2b4, side by side; MLP, 2 threads)",
           "threads", "threads 2", 0.6,
           _row_ratio("shampoo-sync b1024", "other shampoo-sync b1024", "mean ms")),
    *(Target(f"`state_dtype=torch.bfloat16`: Shampoo's steps to Adam's loss ≤ 1.05× float32's "
             f"({task} demo, mean of 3 seeds, 1 thread)", "bf16", f"seeds {task}", 1.05,
             _worst_ratio("Shampoo sync bf16", "steps / base"))
      for task in DEMOS),
)  # fmt: skip


def judged(target: Target, reports: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(figure, verdict) of ``target`` in the committed results."""
    report = reports.get(target.result)
    sections = [s for s in (report or {}).get("sections", []) if
                s["title"].startswith(target.section)]  # fmt: skip
    found = target.measure(sections[0]) if sections else None
    if found is None:
        return "no figure in the committed results", "not measured"
    value, what = found
    return what, "met" if value <= target.limit else "NOT met"

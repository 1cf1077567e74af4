"""Render docs/benchmarks.md and docs/results/NAME.md from docs/results/NAME.json, docs/settings.md
from torch_shampoo/settings.py's SPEC and the README's results table (tests/test_docs.py fails
when a committed page is not this rendering of what is committed).

    python docs/render.py             # rewrite the pages from docs/results/*.json and the spec
    python docs/render.py --check     # exit 1, naming the stale pages, if any differs
    python docs/render.py --run       # run RUNS (below) into docs/results/, then rewrite
    python docs/render.py --run memory,demos   # only those

Run from the repository root with the package importable (``pip install -e .``, or
``PYTHONPATH=.``). Targets live here, beside the figures they judge; never in benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
SETTINGS_MD = ROOT / "docs" / "settings.md"
README = ROOT / "README.md"
DEMOS_PNG = ROOT / "docs" / "images" / "demos.png"
BEGIN, END = "<!-- results: rendered by docs/render.py -->", "<!-- /results -->"

SEEDED = "shampoo-sync,shampoo-async,shampoo-async-unstaggered,shampoo-sync-stagger"
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
    "threads": ["benchmarks.step_time", "--sections", "threads"],
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
    *(Target(f"`compact_state=True`: {what} ≤ {limit}× full matrices' (MLP, block 128, 1 thread)",
             "storage", "storage", limit, _row_ratio("shampoo-compact b128", "shampoo-sync b128",
                                                     header))
      for what, limit, header in (("the non-root step", 1.05, "med ms"),
                                  ("the amortized step", 1.0, "mean ms"))),
    Target("sync roots on every core: the sync amortized step (mean ms) at block 1024 ≤ 0.6× "
           "that with the step's roots on the calling thread alone (MLP, 2 threads)", "threads",
           "threads 2", 0.6, _row_ratio("shampoo-sync b1024", "shampoo-synchere b1024", "mean ms")),
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


# -------------------------------------------------------------------------- rendering


def command(env: dict[str, Any]) -> str:
    """The run's command as a user types it: ``python -m benchmarks.NAME …``, paths relative."""
    argv = shlex.split(env["command"])[1:]
    if argv and re.search(r"benchmarks/\w+\.py$", argv[0]):
        argv = ["-m", "benchmarks." + Path(argv[0]).stem, *argv[1:]]
    root = str(ROOT) + os.sep
    return shlex.join(["python", *(a.replace(root, "") for a in argv)])


def loads(x: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in x)


def machine(env: dict[str, Any]) -> str:
    cpu = f"{env['cores']} cores, {env['cpu_model']} ({' '.join(env['cpu_flags'])})"
    return cpu + (f", {env['gpu']} (CUDA {env['cuda']})" if env.get("gpu") else "")


def threads(env: dict[str, Any]) -> str:
    return f"{env['threads']} torch thread{'' if env['threads'] == 1 else 's'}"


def run_cells(report: dict[str, Any]) -> list[str]:
    """Command, date, machine, torch and threads, load before → after, wall time, commit."""
    e = report["environment"]
    commit = e["git_commit"][:10] + (" (package modified)" if e["package_dirty"] else "")
    return [f"`{command(e)}`", f"{e['date'][:16].replace('T', ' ')} UTC", machine(e),
            f"torch {e['torch']}, {threads(e)}",
            f"load {loads(e['loadavg_before'])} → {loads(e['loadavg_after'])}",
            f"{report['wall_seconds']:.0f} s", commit]  # fmt: skip


def run_line(name: str, report: dict[str, Any]) -> str:
    return " | ".join(run_cells(report))


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def results() -> dict[str, dict[str, Any]]:
    """docs/results/NAME.json by NAME, in the order of RUNS (others after, by name)."""
    order = list(RUNS)
    paths = sorted(RESULTS.glob("*.json"), key=lambda p: (
        order.index(p.stem) if p.stem in order else len(order), p.stem))  # fmt: skip
    return {p.stem: json.loads(p.read_text()) for p in paths}


HEADLINE = "demos"
"""The run shown on docs/benchmarks.md itself (the README's table); the others have a page of
their own, docs/results/NAME.md."""


def where(name: str) -> str:
    """The page (and anchor) of a run's figures, relative to docs/."""
    return f"#{name}" if name == HEADLINE else f"results/{name}.md"


def run_body(name: str, report: dict[str, Any], reports: dict[str, dict[str, Any]]) -> list[str]:
    """A run's environment line, then each section's table, note, load and targets."""
    labels = ("command: ", "date: ", "machine: ", "", "", "wall time: ", "commit: ")
    out = ["; ".join(label + cell for label, cell in zip(labels, run_cells(report)))]
    for s in report["sections"]:
        out += ["", f"### {s['title']}", "", table(s["headers"], s["rows"]), ""]
        out += [s["note"], ""] if s["note"] else []
        out.append(f"(load at its end: {loads(s['loadavg'])})")
        for t in TARGETS:
            if t.result == name and s["title"].startswith(t.section):
                figure, verdict = judged(t, reports)
                out += ["", f"**Target:** {t.text}: {figure}: **{verdict}**."]
    return out


def run_page(name: str, reports: dict[str, dict[str, Any]]) -> str:
    return "\n".join([
        f"# {name}", "",
        f"<!-- Generated by docs/render.py from docs/results/{name}.json: edit that. -->", "",
        "Rendered from its JSON; every run, the targets and how to measure again: "
        "[benchmarks.md](../benchmarks.md).", "",
        *run_body(name, reports[name], reports),
    ]) + "\n"  # fmt: skip


def benchmarks_page(reports: dict[str, dict[str, Any]]) -> str:
    quick_seconds = sum(r["wall_seconds"] for n, r in reports.items() if n in QUICK)
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by docs/render.py from docs/results/*.json: edit those, not this. -->",
        "",
        "Every figure in docs/ is a benchmark's output, rendered from its JSON in `docs/results/`"
        " (this page, one page per run beside its JSON, docs/settings.md and the README's "
        "table). To measure again (each run's wall time: in the table below), then commit "
        "`docs/results/`, `docs/images/demos.png` and the pages:",
        "",
        "```bash",
        "python docs/render.py --run      # RUNS of docs/render.py → docs/results/, then render",
        "python docs/render.py            # render again from the committed JSON",
        "```",
        "",
        "Each run gives its command, date, machine, torch threads, load average (before → "
        "after), wall time and commit; each table the load average at its end. Ratios are "
        "measured side by side in one run (contenders interleaved); `--quick` runs use tiny "
        "sizes: read their ratios as smoke figures, not as the package's performance.",
        "",
        "## Runs",
        "",
        "| result | command | date | machine | torch, threads | load | wall | commit |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| [{n}]({where(n)}) | {run_line(n, r)} |" for n, r in reports.items()),
        "",
        f"`--quick` runs in all: {quick_seconds:.0f} s (target: ≤ 600 s on 2 idle cores).",
        "",
        "## Targets",
        "",
        "| target | where | figure | verdict |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for t in TARGETS:
        figure, verdict = judged(t, reports)
        run = f"[{t.result}]({where(t.result)})" if t.result in reports else t.result
        out.append(f"| {t.text} | {run} `{t.section}…` | {figure} | {verdict} |")
    if HEADLINE in reports:
        out += ["", f"## {HEADLINE}", "", *run_body(HEADLINE, reports[HEADLINE], reports)]
    return "\n".join(out) + "\n"


def fewest(rows: list[list[str]], col: int) -> str:
    """Per demo, the methods with the least ``col`` (rows of the README's results table)."""
    out = []
    for demo in dict.fromkeys(r[0] for r in rows):
        mine = [(float(r[col]), r[1]) for r in rows if r[0] == demo and r[col] != "-"]
        least = min(mine)[0] if mine else None
        names = " and ".join(m for v, m in mine if v == least) or "none"
        out.append(f"{names} ({demo.split(' ')[0]})")
    return ", ".join(out)


def readme_block(reports: dict[str, dict[str, Any]]) -> str:
    """The README's results table: per demo, each method's steps and wall time to Adam's
    final loss (the ``demos`` run: the convergence grid at each method's default lr)."""
    report = reports.get("demos")
    if report is None:
        return f"{BEGIN}\n(no docs/results/demos.json: `python docs/render.py --run demos`)\n{END}"
    rows = []
    for s in report["sections"]:
        demo = s["title"].removeprefix("grid ").split(":")[0]
        steps = s["title"].split(": ")[1].split(",")[0]
        h = s["headers"]
        for r in s["rows"]:
            cell = dict(zip(h, r))
            rows.append([f"{demo} ({steps})", cell["method"], cell["best lr"], cell["train loss"],
                         cell["steps to target"], cell["wall to target s"]])  # fmt: skip
    e = report["environment"]
    return "\n".join([
        BEGIN,
        table(["demo", "method", "lr", "final train loss", "steps to Adam's loss",
               "seconds to Adam's loss"], rows),
        "",
        "Fewest steps to Adam's loss: " + fewest(rows, 4) + ". Fewest seconds: "
        + fewest(rows, 5) + ".",
        "",
        f"From [`docs/benchmarks.md`](docs/benchmarks.md#demos): `{command(e)}`, "
        f"{e['date'][:10]}, {machine(e)}, {threads(e)}, load "
        f"{loads(e['loadavg_before'])} → {loads(e['loadavg_after'])}.",
        END,
    ])  # fmt: skip


def accepted(check: Any) -> str:
    """What a check of torch_shampoo.checks accepts, in words (KeyError: a new kind of check)."""
    kind = type(check).__name__
    if kind == "Real":
        low = "" if check.low is None else f"{'>' if check.low_open else '≥'} {check.low:g}"
        high = "" if check.high is None else f"{'<' if check.high_open else '≤'} {check.high:g}"
        if check.low is not None and check.high is not None:
            span = f"in {'(' if check.low_open else '['}{check.low:g}, {check.high:g}"
            span += ")" if check.high_open else "]"
        else:
            span = low or high
        return f"real {span}" + (", or None" if check.optional else "")
    if kind == "Integer":
        return f"integer ≥ {check.minimum}" + (", or None" if check.optional else "")
    if kind == "Choice":
        return "one of " + ", ".join(f"`{c!r}`" for c in check.choices)
    if kind == "Betas":
        return f"pair of reals in [0, 1{')' if check.high_open else ']'}"
    return {
        "Flag": "bool", "Merge": "`True`, `False` or `'all'`",
        "Staleness": "`'auto'` (or None, the same) or integer ≥ 0",
        "Lr": "real ≥ 0, or a 0-d float tensor", "Damping": "real > 0, or a function of the step",
        "Workers": "None (half the cores) or integer ≥ 1", "Model": "None or an `nn.Module`",
        "StateDtype": "None or `torch.bfloat16`",
    }[kind]  # fmt: skip


def settings_page() -> str:
    from torch_shampoo import settings as spec

    out = [
        "# Settings",
        "",
        "<!-- Generated by docs/render.py from torch_shampoo/settings.py's SPEC: edit that. -->",
        "",
        "Every keyword argument of the three front ends, from the one table the package checks "
        "them with (`torch_shampoo.settings.SPEC`). A bad value is refused when the optimizer or "
        "a param group is made, and again at the next step if it is changed in `param_groups` "
        "(an lr aside), naming the setting and the value. Settings marked *per optimizer* are "
        "constructor arguments only; the others may differ per param group. Which to touch "
        "first, and why: [tuning.md](tuning.md).",
    ]  # fmt: skip
    for front in spec.FRONTS:
        rows = [[f"`{s.name}`", f"`{s.defaults[front]!r}`", accepted(s.check),
                 s.doc + ("" if s.per_group else " (*per optimizer*)")]
                for s in spec.rows(front)]  # fmt: skip
        out += ["", f"### `{front}(params, **kwargs)`", "",
                table(["kwarg", "default", "accepts", "meaning"], rows)]  # fmt: skip
        names = set(spec.kwargs(front))
        rules = [r for r in spec.RULES if front in r.fronts and set(r.needs) <= names]
        if rules:
            out += ["", "Across settings: " + "; ".join(r.requirement for r in rules) + "."]
        if spec.HINTS[front]:
            hints = ", ".join(f"`{k}`" for k in sorted(spec.HINTS[front]))
            out += ["", f"Names it refuses, saying what to pass instead: {hints}."]
    return "\n".join(out) + "\n"


def pages() -> dict[Path, str]:
    """Every generated file and its text (the README: with its results block rendered)."""
    reports = results()
    readme = README.read_text(encoding="utf-8")
    head, _, rest = readme.partition(BEGIN)
    if rest:
        readme = head + readme_block(reports) + rest.partition(END)[2]
    runs = {RESULTS / f"{n}.md": run_page(n, reports) for n in reports if n != HEADLINE}
    return {BENCHMARKS_MD: benchmarks_page(reports), **runs, SETTINGS_MD: settings_page(),
            README: readme}  # fmt: skip


# -------------------------------------------------------------------------------- runs


def run(names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    for name in names:
        out = RESULTS / f"{name}.json"
        argv = [sys.executable, "-m", *RUNS[name], "--out", str(out.relative_to(ROOT))]
        print(f"+ {shlex.join(argv[1:])}  (load {loads(list(os.getloadavg()))})", flush=True)
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        png = out.with_suffix(".png")  # the convergence plot
        if png.exists() and name == "demos":
            png.replace(DEMOS_PNG)
        elif png.exists():
            png.unlink()
    print(f"{time.perf_counter() - began:.0f} s in all (load {loads(list(os.getloadavg()))})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a page is stale")
    p.add_argument("--run", nargs="?", const=",".join(RUNS), default=None,
                   help=f"run these first (default: all of {','.join(RUNS)})")  # fmt: skip
    args = p.parse_args(argv)
    if args.run:
        run(args.run.split(","))
    made = pages()
    stale = [p.relative_to(ROOT) for p in RESULTS.glob("*.md") if p not in made]  # a run removed
    for path in stale if not args.check else []:
        (ROOT / path).unlink()
    for path, text in made.items():
        if (path.read_text(encoding="utf-8") if path.exists() else None) != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(text, encoding="utf-8")
    verb = "stale" if args.check else "rewrote"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "all pages up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark suite's reports: environment and load capture, markdown tables printed as each
section finishes, the JSON report, the shared command line (benchmarks/harness.py re-exports all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}


def git(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def environment(device: str = "cpu") -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "package_dirty": bool(git("status", "--porcelain", "torch_shampoo")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores": os.cpu_count(),
        **_cpu(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "loadavg_before": os.getloadavg(),
    }
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3g}" if seconds < 1 else f"{seconds:.1f} s"


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


class Report:
    """Threads and the device check first; then sections printed as markdown as they finish,
    JSON with the environment at the end."""

    def __init__(self, name: str, args: argparse.Namespace, quick_threads: bool = False) -> None:
        if args.quick and quick_threads and not args.threads:
            args.threads = 1  # tiny ops on 2 threads of a loaded 2-core machine: milliseconds each
        if args.threads:
            torch.set_num_threads(args.threads)
        if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device cuda: no usable GPU here (torch {torch.__version__})")
        self.name, self.args, self.began = name, args, time.perf_counter()
        e = self.env = environment(getattr(args, "device", "cpu"))
        self.sections: list[dict[str, Any]] = []
        print(
            f"# {name}\n\n{e['date']} | commit {e['git_commit'][:10]}"
            f"{' (package modified)' if e['package_dirty'] else ''} | torch {e['torch']} | "
            f"threads {e['threads']} | cores {e['cores']} | {e['cpu_model']} "
            f"({' '.join(e['cpu_flags'])}) | {load()}" + (f" | {e['gpu']}" if "gpu" in e else ""),
            flush=True,
        )

    def section(
        self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "",
        data: Any = None,
    ) -> None:  # fmt: skip
        print(f"\n## {title}\n\n{markdown(headers, rows)}" + (f"\n\n{note}" if note else ""))
        print(f"\n({load()})", flush=True)
        self.sections.append(
            {"title": title, "headers": list(headers), "rows": [list(map(str, r)) for r in rows],
             "note": note, "data": data, "loadavg": os.getloadavg()}
        )  # fmt: skip

    def finish(self) -> Path:
        self.env["loadavg_after"] = os.getloadavg()
        wall = time.perf_counter() - self.began
        out = self.args.out or ROOT / "outputs" / "benchmarks" / f"{self.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"environment": self.env, "args": vars(self.args), "wall_seconds": wall}
        out.write_text(json.dumps({**report, "sections": self.sections}, indent=1, default=str))
        print(f"\n{wall:.0f} s in all, {load()}; wrote {out}")
        return out


def parser(doc: str | None, compare: bool = True, rounds: bool = True, sections: str = "",
           device: bool = False) -> argparse.ArgumentParser:  # fmt: skip
    """The options every entry point shares; ``--sections`` and ``--device`` where asked for."""
    p = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (smoke run)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (outputs/benchmarks/NAME.json)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    if rounds:
        p.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    if compare:
        p.add_argument(
            "--compare", default=None, metavar="PATH_OR_REV",
            help="A/B: another checkout's (or git rev's) torch_shampoo, interleaved with this one",
        )  # fmt: skip
    if sections:
        p.add_argument("--sections", default=sections, help=f"subset of {sections}")
    if device:
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where it runs")
    return p

"""Every benchmark entry point runs as a user runs it (``python -m benchmarks.<name> --quick``,
a section or two, tiny sizes) and writes a JSON report whose tables are well formed and whose
figures are plausible: Adam's ratio to itself is 1, Shampoo keeps more state than Adam, the
losses fall, every timing is positive."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, name: str, *argv: str) -> list[dict[str, Any]]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out), *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"] and report["wall_seconds"] > 0
    sections = report["sections"]
    assert sections, name
    for section in sections:
        assert section["title"] and section["rows"], section["title"]
        for row in section["rows"]:
            assert len(row) == len(section["headers"]), (section["title"], row)
    return sections


def column(section: dict[str, Any], header: str) -> list[str]:
    i = section["headers"].index(header)
    return [row[i] for row in section["rows"]]


def test_step_time_scaling(tmp_path: Path) -> None:
    (scaling,) = run(tmp_path, "step_time", "--sections", "scaling", "--rounds", "1")
    assert column(scaling, "width") == ["64", "128"]
    for cell in column(scaling, "Shampoo b64 ms (/Adam)"):
        ms, ratio = cell.split()
        assert float(ms) > 0 and float(ratio.strip("(x)")) > 0, cell


def test_train_step(tmp_path: Path) -> None:
    (digits,) = run(tmp_path, "train_step", "--demos", "digits", "--steps", "2")
    ratios = dict(zip(column(digits, "contender"), column(digits, "mean/Adam"), strict=True))
    assert ratios["adam"] == "1.00"
    assert {"shampoo-async", "shampoo-sync", "soap-async"} <= set(ratios)
    assert all(float(r) > 0 for r in ratios.values())


@pytest.mark.filterwarnings("ignore")
def test_convergence_grid(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    (grid,) = run(tmp_path, "convergence", "--tasks", "digits", "--sections", "grid")
    losses = dict(zip(column(grid, "method"), column(grid, "train loss"), strict=True))
    assert {"Adam", "Shampoo async", "SOAP async"} <= set(losses)
    assert all(math.isfinite(float(v)) and float(v) < math.log(10) for v in losses.values())
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_memory_state(tmp_path: Path) -> None:
    sections = run(tmp_path, "memory", "--sections", "state")
    for section in sections:
        ratios = dict(zip(column(section, "optimizer"), column(section, "/Adam"), strict=True))
        assert ratios["adam"] == "1.00", section["title"]
        assert float(ratios["shampoo-sync b64"]) > 1, section["title"]
        assert float(ratios["shampoo-compact b64"]) < float(ratios["shampoo-sync b64"])
        assert float(ratios["shampoo-bf16 b64"]) < float(ratios["shampoo-sync b64"])
        assert float(ratios["soap-bf16 b64"]) < float(ratios["soap-sync b64"])


def test_roots_staleness(tmp_path: Path) -> None:
    (staleness,) = run(tmp_path, "roots", "--sections", "staleness")
    stale = dict(zip(column(staleness, "contender"), column(staleness, "max stale"), strict=True))
    assert stale["shampoo-noroot b64"] == "0"
    assert 0 <= int(stale["shampoo-async b64"]) <= 10  # at most the frequency


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_distributed(tmp_path: Path) -> None:
    (table,) = run(tmp_path, "distributed", "--steps", "3")
    modes = column(table, "mode")
    assert set(modes) == {"replicated", "roots", "state"} and len(modes) == 6
    rows = list(zip(column(table, "rank"), modes, map(float, column(table, "state MB"))))
    for rank in ("0", "1"):
        mb = {mode: value for r, mode, value in rows if r == rank}
        assert 0 < mb["state"] < mb["replicated"], rows  # partition_state: a share per rank

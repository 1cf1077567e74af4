"""Smoke tests: the quickstart, both example scripts and the convergence benchmark run end to end
with tiny step counts, reduce the loss and write their plot / JSON outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load(relpath: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import a script by path, with its directory and examples/ importable (for _common)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(f"smoke_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: far faster than two when other processes load the 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def example_deps() -> None:
    for name in ("tqdm", "matplotlib", "sklearn"):
        pytest.importorskip(name)


def test_quickstart(monkeypatch: pytest.MonkeyPatch) -> None:
    losses = load("examples/quickstart.py", monkeypatch).main(["--steps", "40"])
    assert len(losses) == 40
    assert losses[-1] < 0.75 * losses[0]


def check_comparison(results: list, plot: Path) -> None:
    methods = [r.method for r in results]
    assert {"Adam", "Shampoo sync", "Shampoo async"} <= set(methods)
    for r in results:
        assert not r.diverged, r.method
        assert r.smoothed[-1] < r.train_losses[0], r.method
        assert r.eval_losses and r.step_times
    assert plot.stat().st_size > 0


@pytest.mark.usefixtures("example_deps")
def test_train_charlm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load("examples/train_charlm.py", monkeypatch)
    out = tmp_path / "charlm.png"
    argv = ["--steps", "15", "--d-model", "32", "--layers", "1", "--seq-len", "32"]
    results = module.main([*argv, "--batch", "8", "--quiet", "--out", str(out)])
    check_comparison(results, out)


@pytest.mark.usefixtures("example_deps")
def test_train_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load("examples/train_digits.py", monkeypatch)
    out = tmp_path / "digits.png"
    results = module.main(["--steps", "50", "--batch", "32", "--quiet", "--out", str(out)])
    check_comparison(results, out)
    assert "SGD-momentum" in [r.method for r in results]
    assert all(0.0 <= r.eval_accs[-1] <= 1.0 for r in results)


@pytest.mark.usefixtures("example_deps")
@pytest.mark.filterwarnings("ignore:NGPlus. no per-sample statistics:UserWarning")
def test_convergence_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load("benchmarks/convergence.py", monkeypatch)
    report = module.main(["--quick", "--quiet", "--out-dir", str(tmp_path)])
    assert (tmp_path / "convergence.png").stat().st_size > 0
    saved = json.loads((tmp_path / "convergence.json").read_text())
    assert saved["environment"]["threads"] >= 1
    assert set(saved["tasks"]) == {"digits", "charlm"}
    for name, task in report["tasks"].items():
        assert task["target"] is not None, name
        assert {"Adam", "Shampoo async"} <= set(task["best_lr"]), name
        for run in task["runs"]:
            if run["lr"] == task["best_lr"][run["method"]]:
                assert run["final_train_loss"] < run["train_losses"][0], (name, run["method"])

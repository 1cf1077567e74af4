"""The docs say what the code and the committed results say: docs/benchmarks.md, docs/settings.md
and the README's results table are docs/render.py's rendering of docs/results/*.json and the
settings spec; the README is a short guide whose commands, quickstart, links and root_stats()
keys are the code's."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

import torch_shampoo

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_render", ROOT / "docs" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_committed_pages_are_the_rendering_of_the_committed_results_and_spec(
    render: ModuleType,
) -> None:
    for path, text in render.pages().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run `python docs/render.py`"
        )


def test_a_changed_figure_changes_the_page(render: ModuleType) -> None:
    reports = render.results()
    assert "12345.678" not in "".join(render.pages().values())
    for name in (render.HEADLINE, "step_time"):
        changed = copy.deepcopy(reports)
        changed[name]["sections"][0]["rows"][0][-1] = "12345.678"
        changed_pages = [render.benchmarks_page(changed), render.run_page(name, changed)]
        assert "12345.678" in "".join(changed_pages)


def test_every_result_has_its_command_date_machine_threads_and_load(render: ModuleType) -> None:
    reports = render.results()
    assert set(render.QUICK) | {"demos"} <= set(reports)
    pages = {p.stem: p for p in (ROOT / "docs" / "results").glob("*.md")}
    assert set(pages) == set(reports) - {render.HEADLINE}  # (no page of a removed run)
    for name, report in reports.items():
        path = ROOT / "docs" / "benchmarks.md" if name == render.HEADLINE else pages[name]
        page = path.read_text(encoding="utf-8")
        env = report["environment"]
        line = render.run_line(name, report)
        assert render.command(env).startswith("python -m benchmarks.")
        for part in (render.command(env), env["date"][:10], env["cpu_model"],
                     render.threads(env), "load "):  # fmt: skip
            assert part in line and part in page, (name, part)


def test_a_target_is_judged_against_its_figure_on_the_default(render: ModuleType) -> None:
    """The state target is the default's (async Shampoo), not the least of the variants."""
    target = render.TARGETS[0]
    rows = [
        ["adam", "1", "1.00"],
        ["shampoo-compact b128", "1", "1.05"],
        ["shampoo-async b128", "2", "2.05"],
        ["shampoo-async b1024", "1", "1.5"],
    ]
    section = {"title": target.section, "headers": ["optimizer", "state MB", "/Adam"], "rows": rows}
    reports = {target.result: {"sections": [section]}}
    assert render.judged(target, reports) == ("shampoo-async b128: 2.05× Adam's", "met")
    section["rows"][2][2] = "2.20"
    assert render.judged(target, reports)[1] == "NOT met"
    assert render.judged(target, {})[1] == "not measured"


def test_the_warm_roots_target_takes_the_worst_model(render: ModuleType) -> None:
    (target,) = [t for t in render.TARGETS if t.result == "roots_warm"]
    headers = ["model", "contender", "per cycle ms", "/ eigh_every=1"]
    rows = [["MLP", "eigh_every=1", "10", "1.00"], ["MLP", "eigh_every=5", "3", "0.30"],
            ["char-LM", "eigh_every=5", "5", "0.50"]]  # fmt: skip
    reports = {"roots_warm": {"sections": [{"title": target.section + ": x", "headers": headers,
                                       "rows": rows}]}}  # fmt: skip
    figure, verdict = render.judged(target, reports)
    assert verdict == "NOT met" and "MLP: 0.30×" in figure and "char-LM: 0.50×" in figure
    rows[2][3] = "0.40"
    assert render.judged(target, reports)[1] == "met"


def test_every_check_of_the_spec_is_described_in_words(render: ModuleType) -> None:
    from torch_shampoo import settings

    for s in settings.SPEC:
        assert "(" not in render.accepted(s.check).split(" ")[0], s.name  # not a repr


def test_the_readme_is_a_short_guide() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, len(lines)


def test_the_readme_has_the_two_setup_commands_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    venv = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install"
    demo = f'{venv} -e ".[examples]" && .venv/bin/python examples/train_charlm.py'
    tests = f'{venv} -e ".[test]" && .venv/bin/python -m pytest'
    assert [line for line in text.splitlines() if line.startswith(venv)] == [demo, tests]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    pattern = re.search(r"grep -m1 -E '([^']+)' README.md", ci)
    assert pattern and re.fullmatch(pattern.group(1), tests)


def test_the_readme_quickstart_is_the_example_file() -> None:
    source = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    core = source.split("# quickstart: begin\n", 1)[1].split("    # quickstart: end", 1)[0]
    readme = README.read_text(encoding="utf-8")
    block = readme.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert block.endswith(textwrap.dedent(core))
    head = block.removesuffix(textwrap.dedent(core))
    assert head.startswith("import torch\nfrom torch import nn\n\nimport torch_shampoo\n")


def test_the_docs_link_to_files_that_exist() -> None:
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), (page.name, target)


def test_the_root_stats_keys_in_the_docs_are_those_it_returns() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    with torch_shampoo.Shampoo([p], async_roots=False) as opt:
        p.grad = torch.randn(4, 3)
        opt.step()
        keys = set(opt.root_stats())
    text = (ROOT / "docs" / "tuning.md").read_text(encoding="utf-8")
    block = text.split("root_stats() keys:", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`(\w+)`", block)) == keys

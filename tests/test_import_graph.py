"""The package's modules form layers: no import cycle, at run time or under ``TYPE_CHECKING``,
so a lower module never imports a higher one. Every import counts: ``from .x import``,
``from . import x``, ``import torch_shampoo.x``, at module level, inside functions and inside
``if TYPE_CHECKING:``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "torch_shampoo"
NAME = PACKAGE.name


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that the module at ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module
            elif node.level == 0 and node.module and node.module.split(".")[0] == NAME:
                base = node.module.partition(".")[2] or None
            else:
                continue
            if base:  # from .x import ... / from torch_shampoo.x import ...
                found.add(base.split(".")[0])
            else:  # from . import x / from torch_shampoo import x
                found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == NAME and len(parts) > 1:
                    found.add(parts[1])
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {p.stem: p for p in PACKAGE.glob("*.py")}
    modules = set(paths) - {"__init__"}
    return {m: _imports(paths[m], modules) - {m} for m in sorted(modules)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """0 for a module that imports none of the package, else one above its highest import."""
    level: dict[str, int] = {}

    def of(m: str) -> int:
        if m not in level:
            level[m] = 1 + max((of(n) for n in graph[m]), default=-1)
        return level[m]

    for m in graph:
        of(m)
    return level


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_modules_form_layers() -> None:
    graph = import_graph()
    assert _cycle(graph) is None
    level = levels(graph)
    for n in range(max(level.values()) + 1):
        print(f"level {n}: {', '.join(sorted(m for m in level if level[m] == n))}")
    for m, imported in graph.items():  # every import points down
        assert all(level[n] < level[m] for n in imported), m
    assert not graph["telemetry"]  # the report is a pure function of plain data
    for part in ("cycles", "checkpoint", "ledger", "telemetry", "step", "bucketed"):
        assert level[part] < level["engine"], part
    for front in ("optimizer", "soap", "ngplus"):
        assert level[front] > level["engine"]
        assert not any(front in imported for imported in graph.values()), front

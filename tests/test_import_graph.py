"""The package's modules form layers: no import cycle, at run time or under ``TYPE_CHECKING``,
so a lower module never imports a higher one. Every import counts: ``from .x import``,
``from ..x import y``, ``from . import x``, ``import torch_shampoo.x.y``, at module level, inside
functions and inside ``if TYPE_CHECKING:``. Modules are named by their dotted path in the package
(``roots.scheduler``); a subpackage's ``__init__`` counts only when something imports it alone."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "torch_shampoo"
NAME = PACKAGE.name


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that the module at ``path`` imports, anywhere in it."""
    here = _name(path).split(".")
    package = here if path.stem == "__init__" else here[:-1]
    found: set[str] = set()

    def add(base: list[str], names: list[str]) -> None:
        subs = {".".join([*base, n]) for n in names} & modules
        found.update(subs or ({".".join(base)} & modules))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            tail = node.module.split(".") if node.module else []
            if node.level:
                base = package[: len(package) - (node.level - 1)] + tail
            elif tail and tail[0] == NAME:
                base = tail[1:]
            else:
                continue
            add(base, [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == NAME and len(parts) > 1:
                    add(parts[1:], [])
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_name(p): p for p in PACKAGE.rglob("*.py")}
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
    for part in ("root_cycles", "checkpoint", "ledger", "telemetry", "update.per_unit"):
        assert level[part] < level["engine"], part
    for front in ("shampoo", "soap", "ngplus"):
        assert level[front] > level["engine"]
        assert not any(front in imported for imported in graph.values()), front


def test_the_lower_subpackages_import_nothing_above_them() -> None:
    """``layout``, ``roots`` and ``distributed`` are the engine's parts: none of them imports the
    step's math (``update``), the engine, its collaborators or a front end."""
    graph = import_graph()
    above = ("update.", "engine", "root_cycles", "ledger", "checkpoint")
    above += ("shampoo", "soap", "ngplus")
    for m, imported in graph.items():
        if m.startswith(("layout.", "roots.", "distributed.")):
            bad = sorted(n for n in imported if n.startswith(above))
            assert not bad, f"{m} imports {bad}"


def test_the_design_documents_every_module_at_its_level_with_its_imports() -> None:
    """docs/design.md's layout table (level | module | owns | imports) is the graph: every
    module once (subpackages' ``__init__`` aside), each row's level and imports as the code has
    them."""
    design = PACKAGE.parent / "docs" / "design.md"
    graph, rows = import_graph(), {}
    for line in design.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            imports = set() if cells[3] == "—" else {n.strip() for n in cells[3].split(",")}
            for module in cells[1].replace("`", "").split(","):
                rows[module.strip()] = (int(cells[0]), imports)
    level = levels(graph)
    modules = {m for m in graph if not (PACKAGE / m).is_dir()}
    assert set(rows) == modules, set(rows) ^ modules
    for m, (documented_level, documented) in rows.items():
        assert (documented_level, documented) == (level[m], graph[m]), m

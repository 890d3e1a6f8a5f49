"""The package's import graph: no module imports one that imports it back, and the layers point one way.

Every `import` counts, also those inside functions (a lazy import is still a dependency); modules
named only in strings (the method and evaluator registries) are plug-ins, not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maskjax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from maskjax.x import y` imports maskjax.x.y when that is a module, else maskjax.x.
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    # The parser sees the real edges (a graph with no edges would pass trivially).
    assert "maskjax.methods" in graph["maskjax.train"] and "maskjax.masking" in graph["maskjax.methods.bert"]
    assert cycles(graph) == []


def test_layers_point_one_way():
    """masking, losses and models know nothing of methods or training; methods know nothing of the loop."""
    graph = import_graph()
    above = {"maskjax.train", "maskjax.aot", "maskjax.cli", "maskjax.describe", "maskjax.methods"}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for w in graph[todo.pop()] - seen:
                seen.add(w)
                todo.append(w)
        return seen

    for low in ("maskjax.masking", "maskjax.losses", "maskjax.models", "maskjax.sharding"):
        members = [m for m in graph if m == low or m.startswith(low + ".")]
        for m in members:
            assert not reaches(m) & above, (m, sorted(reaches(m) & above))
    for m in [m for m in graph if m.startswith("maskjax.methods")]:
        assert not reaches(m) & {"maskjax.train", "maskjax.aot", "maskjax.cli", "maskjax.describe"}, m

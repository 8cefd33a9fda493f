"""The package code's import graph: no import circle, and every import points down the layers.

The layers, bottom up: ``tokenizer`` (stage one, with ``tokenizer.core``, the shared home) <- ``generator``
(stage two) <- ``sampling`` (sampling and evaluation) <- ``slurm`` (the command line and jobs). A module
may import its own layer and the layers below it, never one above; ``tokenizer.core`` imports nothing of
``tokenizer`` outside itself. The graph is read with ``ast`` from the source (nothing is imported), and
counts every import, also those inside functions (a lazy import still ties the two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("tokenizer", "generator", "sampling", "slurm")  # bottom up
CORE = "tokenizer.core"



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Module name -> source file of every module of the four packages."""
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up the layers, or out of ``tokenizer.core`` into the rest of ``tokenizer``."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            up = rank[target.split(".")[0]] > rank[source.split(".")[0]]
            out_of_core = (source == CORE or source.startswith(CORE + ".")) and target.startswith("tokenizer.") \
                and not (target == CORE or target.startswith(CORE + "."))
            if up or out_of_core:
                found.append(f"{source} imports {target}")
    return found


def test_the_checker_sees_cycles_and_upward_imports() -> None:
    graph = {"tokenizer.a": {"tokenizer.b"}, "tokenizer.b": {"tokenizer.a"}, "tokenizer.core.c": {"tokenizer.a"},
             "generator.d": {"tokenizer.a", "sampling.e"}, "sampling.e": {"generator.d"}}
    assert find_cycles(graph) == [["tokenizer.a", "tokenizer.b"], ["generator.d", "sampling.e"]]
    assert layering_violations(graph) == ["generator.d imports sampling.e", "tokenizer.core.c imports tokenizer.a"]


def test_the_graph_is_read_from_the_packages() -> None:
    graph = import_graph()
    assert len(graph) > 40
    assert "tokenizer.core.checkpoint" in graph["tokenizer.core.weights"] | graph["generator.cache"]
    assert "sampling.fid" in graph["sampling.report"]  # a relative import (from .fid import ...)


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_point_down_the_layers() -> None:
    assert layering_violations(import_graph()) == []

"""The package's import graph, read from source: no cycles (lazy imports inside functions
included) and no private names taken from another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, list[tuple[str, str | None]]]:
    """{module: [(imported module, imported name or None)]} for imports inside the package."""
    graph: dict[str, list[tuple[str, str | None]]] = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        found: list[tuple[str, str | None]] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmprune"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.append((sub, None) if sub in modules else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                found += [(a.name, None) for a in node.names if a.name.startswith("llmprune")]
        graph[module_name(path)] = [(m, n) for m, n in found if m in modules]
    return graph


def test_the_graph_is_read():
    graph = imports()
    assert ("llmprune.engine.driver", "prune") in graph["llmprune.jobs.stores"]
    assert len(graph) > 30


def test_no_private_names_across_modules():
    bad = [(module, target, name) for module, edges in imports().items() for target, name in edges
           if name and name.startswith("_") and not name.endswith("__") and target != module]
    assert bad == []


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in edges if t != m and t != "llmprune"}) for m, edges in imports().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


# Each layer imports only from layers before it (and from itself).
LAYERS = ["errors", "progress", "core", "methods", "io", "engine", "structured", "eval", "analysis", "jobs",
          "service", "cli", "api"]


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)  # the package itself: on top


def test_imports_point_down_the_layers():
    graph = imports()
    outside = [m for m in graph if m != "llmprune" and m.split(".")[1] not in LAYERS]
    assert outside == []
    upward = sorted({(module, target) for module, edges in graph.items() for target, _ in edges
                     if target != "llmprune" and layer(target) > layer(module)})
    assert upward == []


# Library code changes nothing for the whole process: these patch torch or transformers globally
# (accelerate's empty-weights contexts replace nn.Module.register_parameter for every thread).
PROCESS_WIDE = {"init_empty_weights", "init_on_device", "umask", "matplotlib.use", "set_default_dtype"}


def test_no_process_wide_patches_in_library_code():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute):
                base = node.value.id if isinstance(node.value, ast.Name) else ""
                name = f"{base}.{node.attr}" if f"{base}.{node.attr}" in PROCESS_WIDE else node.attr
            elif isinstance(node, ast.Name):
                name = node.id
            elif isinstance(node, ast.alias):
                name = node.name
            if name in PROCESS_WIDE:
                found.append((module_name(path), name))
    assert found == []

"""The package's layers import one way (docs/architecture.md), and no module imports itself back.

Every import statement counts, also those inside functions: the whole tree is parsed, nothing is
imported. A lower layer importing a higher one, two packages of one layer importing each other, or
a cycle among modules fails with the offending modules named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "repro"

LAYERS: list[tuple[str, ...]] = [
    ("repro.exceptions",),
    ("repro.layout", "repro.frames", "repro.io"),
    ("repro.config",),
    ("repro.data", "repro.nn"),
    ("repro.training",),
    ("repro.methods",),
    ("repro.evaluation",),
    ("repro.reporting",),
    ("repro.pipeline",),
    ("repro.streaming", "repro.models", "repro.metrics", "repro.__main__"),  # public paths
]
"""Lowest first. A module may import its own component and any component of a lower layer."""


def component(module: str) -> tuple[int, str]:
    """(layer index, component name) of a ``repro`` module."""
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return index, name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every ``repro`` module that ``path`` imports, anywhere in the file."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "repro" or name.startswith("repro.")}


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (names that are modules, not attributes)."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        module: {name for name in imports_of(path, module) if name in files and name != module}
        for module, path in files.items()
    }


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in sorted(graph.items()):
        if module == "repro":
            continue
        layer, name = component(module)
        for other in sorted(imported):
            if other == "repro":
                continue
            other_layer, other_name = component(other)
            if other_name != name and other_layer >= layer:
                problems.append(f"{module} (layer {layer}) imports {other} (layer {other_layer})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_goes_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_no_import_cycle_even_inside_functions():
    assert cycles(import_graph()) == []


def test_library_code_does_not_use_the_public_re_exports():
    graph = import_graph()
    shims = {"repro.streaming", "repro.models", "repro.metrics"}
    users = [m for m, imported in graph.items() if imported & shims and m not in shims]
    assert users == []


def test_the_checks_fail_on_a_reverse_import_and_a_cycle():
    graph = import_graph()
    graph["repro.data.slides"] = graph["repro.data.slides"] | {"repro.methods.mil"}
    problems = layer_violations(graph)
    assert problems == ["repro.data.slides (layer 3) imports repro.methods.mil (layer 5)"]
    assert any("repro.data.slides" in group for group in cycles(graph))
    peer = {**graph, "repro.data.tissue": graph["repro.data.tissue"] | {"repro.nn.resnet"}}
    assert "repro.data.tissue (layer 3) imports repro.nn.resnet (layer 3)" in layer_violations(peer)


def test_a_function_local_import_is_seen(tmp_path):
    source = tmp_path / "repro" / "data" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from repro.reporting import figures\n")
    found = imports_of(source, "repro.data.x")
    assert "repro.reporting.figures" in found


@pytest.mark.parametrize("module", ["repro.streaming", "repro.models", "repro.metrics"])
def test_public_paths_still_import(module):
    __import__(module)

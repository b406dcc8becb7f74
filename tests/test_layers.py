"""The package's layers point only down, and no modules import each other in a circle.

The layers and their order are read from the diagram in docs/ARCHITECTURE.md (the ```layers block,
top layer first; names on one line are siblings, which may not import each other), so the picture
and the code cannot drift apart. ``python tests/test_layers.py`` prints the layer graph found.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "respec"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def declared_layers() -> dict[str, int]:
    """Layer name ("engine", "cli.py", ...) -> rank (0 = the bottom), from the diagram."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = lines.index("```layers") + 1
    rows = [line.split() for line in lines[start: lines.index("```", start)] if line.strip()]
    return {name.rstrip("/"): len(rows) - 1 - rank for rank, row in enumerate(rows) for name in row}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``respec`` modules ``name`` imports (anywhere in the file, lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__.py"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else f"{parts[1]}.py"


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def layer_graph(graph: dict[str, set[str]]) -> Counter:
    return Counter((layer_of(a), layer_of(b)) for a, targets in graph.items() for b in targets
                   if layer_of(a) != layer_of(b))


def format_layer_graph(graph: dict[str, set[str]]) -> str:
    ranks = declared_layers()
    counts = Counter(layer_of(m) for m in graph)
    edges = layer_graph(graph)
    lines = []
    for layer in sorted(ranks, key=lambda name: -ranks[name]):
        below = ", ".join(f"{b} ({n})" for (a, b), n in sorted(edges.items(), key=lambda e: -ranks[e[0][1]])
                          if a == layer)
        lines.append(f"{layer:<12} {counts.get(layer, 0):>3} modules -> {below or 'nothing'}")
    return "\n".join(lines)


def test_every_layer_in_the_code_is_in_the_diagram_and_the_reverse():
    in_code = {layer_of(m) for m in modules()}
    assert in_code == set(declared_layers()), f"code {sorted(in_code)} vs diagram {sorted(declared_layers())}"


def test_imports_point_only_down():
    ranks = declared_layers()
    graph = import_graph()
    upward = [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, targets in graph.items() for b in targets
              if ranks[layer_of(b)] > ranks[layer_of(a)]
              or (ranks[layer_of(b)] == ranks[layer_of(a)] and layer_of(b) != layer_of(a))]
    print(format_layer_graph(graph))
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "modules importing each other in a circle: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_catches_an_upward_import_and_a_cycle():
    """Negative control: a graph with a model importing the engine, and two modules in a circle."""
    graph = defaultdict(set, {"respec.models.a": {"respec.engine.b"}, "respec.engine.b": {"respec.engine.c"},
                              "respec.engine.c": {"respec.engine.b"}})
    ranks = declared_layers()
    assert ranks[layer_of("respec.engine.b")] > ranks[layer_of("respec.models.a")]
    assert cycles(dict(graph)) == [["respec.engine.b", "respec.engine.c"]]


if __name__ == "__main__":
    graph = import_graph()
    print(format_layer_graph(graph))
    print(f"cycles: {cycles(graph) or 'none'}")
    sys.exit(0)

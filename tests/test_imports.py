"""The import graph of src/quantbuild has floors and no circles (STYLE.md, habit 11).

Every import counts, the ones inside functions too: a lazy import still makes one module
depend on another, and a circle through one is a circle a reader has to climb. A package's
`__init__` may import its own submodules (a registry), but nothing imports from a package
whose `__init__` imports it back, and no module reads another module's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "quantbuild"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> the quantbuild modules it imports, [(importer, module, private name)])."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private: list[tuple[str, str, str]] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node)
                targets = []
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        targets.append(submodule)
                    else:
                        targets.append(source)
                        if alias.name.startswith("_") and source.startswith(PACKAGE):
                            private.append((name, source, alias.name))
            else:
                continue
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_no_module_imports_another_module_s_private_names():
    _, private = import_graph()
    assert private == []


def test_the_check_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_measuring_modules_reach_models_only_through_runtimes():
    """Building and running stay apart: evaluation, the behavioural probes and verify import
    no quantizer (loading and kernels live in runtimes/), and no quantizer imports the
    evaluation."""
    graph, _ = import_graph()
    measuring = [name for name in graph if name.startswith(f"{PACKAGE}.evaluation")
                 or name in (f"{PACKAGE}.behaviour", f"{PACKAGE}.release.verify")]
    for name in measuring:
        assert not [target for target in graph[name] if target.startswith(f"{PACKAGE}.quantizers")], name
    for name in graph:
        if name.startswith(f"{PACKAGE}.quantizers"):
            assert not any(target.startswith(f"{PACKAGE}.evaluation") for target in graph[name]), name

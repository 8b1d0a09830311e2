"""deploy/ imports: no cycle between its modules, no Lightning, and each layer above the ones it builds on.

Every import statement counts, lazy ones inside functions and ``TYPE_CHECKING`` ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
DEPLOY = "fx_lightning.deploy"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Module -> the names it imports (a module, or a package's attribute as ``package.name``)."""
    found: dict[str, set[str]] = {}
    for path in (SRC / "fx_lightning").rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        found[name] = targets
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
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
                components.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return components


def deploy_edges() -> dict[str, set[str]]:
    found = imports()
    modules = {m for m in found if m == DEPLOY or m.startswith(DEPLOY + ".")}
    return {m: {t for t in found[m] if t in modules and t != m} for m in modules}


def test_deploy_has_no_import_cycle() -> None:
    edges = deploy_edges()
    assert len(edges) > 10  # the walk found the modules
    assert cycles(edges) == []


def test_cycles_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_deploy_never_imports_lightning() -> None:
    found = imports()
    offending = {
        m: sorted(t for t in targets if t.split(".")[0] in ("lightning", "pytorch_lightning") or ".lightning" in t)
        for m, targets in found.items()
        if m.startswith(DEPLOY)
    }
    assert {m: t for m, t in offending.items() if t} == {}


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("fx_lightning.deploy.check", "fx_lightning.deploy.int8.gate"),
        ("fx_lightning.deploy.report", "fx_lightning.deploy.check"),
        ("fx_lightning.deploy.int8.gate", "fx_lightning.deploy.flow"),
        ("fx_lightning.deploy.int8.backends", "fx_lightning.deploy.int8.onnx"),
        ("fx_lightning.deploy.export", "fx_lightning.deploy.check"),
    ],
)
def test_deploy_layers_import_downwards(lower: str, upper: str) -> None:
    edges = deploy_edges()
    assert lower in edges[upper]  # the upper layer builds on the lower one
    reachable, todo = set(), [lower]
    while todo:
        for target in edges[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    assert upper not in reachable  # and nothing below reaches back up

"""The package's shape: the rooms import only downwards, nothing imports in a circle, and old paths still work.

The import graph is read from the source (every ``import`` statement, those inside functions included), so a lazy
import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import fx_lightning
from fx_lightning import _aliases

PACKAGE = Path(fx_lightning.__file__).resolve().parent
#: The rooms that must run without Lightning installed.
LIGHTNING_FREE = ("fx_lightning.fusion", "fx_lightning.verify", "fx_lightning.deploy")
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric", "fx_lightning.lightning", "fx_lightning.examples")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module ``name``'s source imports (absolute names; a ``from m import x`` of a sub-module names it)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    resolved = set()
    for imported in found:
        home = _aliases.new_home(imported)
        resolved.add(home if home is not None else imported)
    return resolved


GRAPH = {name: {i for i in _imports(name) if i in MODULES and i != name} for name in MODULES}


def test_the_import_graph_sees_every_room() -> None:
    # Guards the walk itself: it must find the modules and the edges it reasons about.
    assert {"fx_lightning.fusion.engine", "fx_lightning.deploy.flow", "fx_lightning.lightning.callback"} <= set(GRAPH)
    assert "fx_lightning.fusion.report" in GRAPH["fx_lightning.fusion.engine"]
    assert "lightning.pytorch.callbacks" in _imports("fx_lightning.lightning.callback")


@pytest.mark.parametrize("room", LIGHTNING_FREE)
def test_rooms_below_the_lightning_layer_never_import_lightning(room: str) -> None:
    offenders = []
    for name in (n for n in MODULES if n == room or n.startswith(room + ".")):
        # Everything the module reaches through the package, followed transitively.
        seen, stack = {name}, [name]
        while stack:
            current = stack.pop()
            for imported in _imports(current):
                if imported.startswith(LIGHTNING) or imported in LIGHTNING:
                    offenders.append(f"{name} reaches {imported} (through {current})")
                elif imported in GRAPH and imported not in seen:
                    seen.add(imported)
                    stack.append(imported)
    assert not offenders, "\n".join(offenders)


def _cycle_from(start: str) -> list[str] | None:
    path: list[str] = []
    on_path: set[str] = set()
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(GRAPH[node]):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(node)
        return None

    return visit(start)


def test_no_import_cycle_in_the_package() -> None:
    cycles = [c for c in (_cycle_from(name) for name in sorted(GRAPH)) if c]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("old", sorted(_aliases.ALIASES))
def test_old_module_paths_are_the_moved_modules(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(_aliases.ALIASES[old])


def test_old_sub_module_paths_follow_their_package() -> None:
    old = importlib.import_module("fx_lightning.runtimes.onnx")
    assert old is importlib.import_module("fx_lightning.deploy.formats.onnx")
    assert _aliases.new_home("fx_lightning.exporter") is None  # a prefix of a name is not an old path


def test_the_paths_the_readme_documents_import() -> None:
    from fx_lightning.artifacts import export_and_verify
    from fx_lightning.compare import compare_trees
    from fx_lightning.export import export_artifacts, write_artifacts
    from fx_lightning.runtimes import registered_exporters

    from fx_lightning.verify import verify

    assert export_and_verify is fx_lightning.export_and_verify
    for function in (compare_trees, verify, export_artifacts, write_artifacts):
        assert callable(function)
    assert "onnx" in registered_exporters()


def test_the_public_api_is_sorted_and_complete() -> None:
    assert fx_lightning.__all__ == sorted(fx_lightning.__all__)
    for name in fx_lightning.__all__:
        assert getattr(fx_lightning, name) is not None, name
    with pytest.raises(AttributeError, match="module 'fx_lightning' has no attribute 'fuze'"):
        fx_lightning.fuze  # noqa: B018

"""The module paths of earlier releases, kept importable: ``fx_lightning.export`` is ``fx_lightning.deploy.export``.

Each old path resolves to the very module object at its new home (not a copy), so an attribute set or patched
through either path is seen through both. Sub-modules follow their package (``fx_lightning.runtimes.onnx``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

#: old module path -> the module that now holds the same code
ALIASES = {
    "fx_lightning.artifacts": "fx_lightning.deploy.flow",
    "fx_lightning.callback": "fx_lightning.lightning.callback",
    "fx_lightning.cli": "fx_lightning.lightning.cli",
    "fx_lightning.compare": "fx_lightning.verify.compare",
    "fx_lightning.data": "fx_lightning.examples.data",
    "fx_lightning.export": "fx_lightning.deploy.export",
    "fx_lightning.models": "fx_lightning.examples.models",
    "fx_lightning.runtimes": "fx_lightning.deploy.formats",
}


def new_home(name: str) -> str | None:
    """The module that an old path ``name`` stands for, or None when ``name`` is not an old path.

    Example:
        >>> new_home("fx_lightning.runtimes.onnx")
        'fx_lightning.deploy.formats.onnx'
    """
    for old, new in ALIASES.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if new_home(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return ModuleType(spec.name)  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module: ModuleType) -> None:
        home = new_home(module.__name__)
        assert home is not None
        # The import system returns what sys.modules holds under the old name once this returns.
        sys.modules[module.__name__] = importlib.import_module(home)


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # before the path finder, which would load a second copy

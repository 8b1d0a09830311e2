"""Import a program from scripts/ as a module, so tests can call its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(filename: str) -> ModuleType:
    """Execute ``scripts/<filename>`` as a module named after it and return the module."""
    name = f"{Path(filename).stem}_script"
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / filename)
    if spec is None or spec.loader is None:
        raise ImportError(f"load_script({filename!r}): no loadable file at {SCRIPTS / filename}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the script is being executed.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

"""Dotted module paths (``"layer1.0.conv1"``, ``""`` for the model itself): finding, nesting, common prefix."""

from __future__ import annotations

from torch import nn


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` below ``root``, or ``None`` when there is none."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def common_scope(scopes: list[str]) -> str:
    """The deepest module path that holds every one of ``scopes``.

    Example:
        >>> common_scope(["layer1.0.conv1", "layer1.0.bn1", "layer1.1"]), common_scope(["a", "b"])
        ('layer1', '')
    """
    parts = [s.split(".") if s else [] for s in scopes]
    common = []
    for names in zip(*parts):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return ".".join(common)


def within(path: str, scope: str) -> bool:
    """Whether ``path`` lies inside the module at ``scope`` (``""`` holds everything).

    Example:
        >>> within("layer1.0.conv1", "layer1"), within("layer10", "layer1"), within("fc", "")
        (True, False, True)
    """
    return not scope or path == scope or path.startswith(scope + ".")

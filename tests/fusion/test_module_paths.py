"""Dotted module paths: ``find_module``, ``common_scope`` and ``within``, with ``""`` for the model itself."""

from __future__ import annotations

import pytest
from torch import nn

from fx_lightning.fusion.module_paths import common_scope, find_module, within


def _model() -> nn.Module:
    inner = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    return nn.ModuleDict({"layer1": nn.Sequential(inner, nn.ReLU()), "fc": nn.Linear(1, 1)})


def test_find_module_follows_dotted_paths() -> None:
    model = _model()
    assert find_module(model, "layer1.0.1") is model["layer1"][0][1]
    assert find_module(model, "fc") is model["fc"]


def test_find_module_empty_path_is_the_root() -> None:
    model = _model()
    assert find_module(model, "") is model


@pytest.mark.parametrize("path", ["missing", "layer1.5", "layer1.0.1.weight_extra", "fc.weight", "layer1..0"])
def test_find_module_returns_none_when_there_is_no_module(path: str) -> None:
    assert find_module(_model(), path) is None


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        (["layer1.0.conv1", "layer1.0.bn1", "layer1.1"], "layer1"),
        (["layer1.0.conv1", "layer1.0.bn1"], "layer1.0"),
        (["a", "b"], ""),
        (["a.b.c"], "a.b.c"),
        (["a.b", "a.b.c"], "a.b"),
        (["a.b", ""], ""),
        (["layer1.0", "layer10.0"], ""),  # whole names, not string prefixes
        ([], ""),
    ],
)
def test_common_scope_is_the_deepest_shared_module(scopes: list[str], expected: str) -> None:
    assert common_scope(scopes) == expected


@pytest.mark.parametrize(
    ("path", "scope", "expected"),
    [
        ("layer1.0.conv1", "layer1", True),
        ("layer1", "layer1", True),
        ("layer10", "layer1", False),
        ("layer10.0", "layer1", False),
        ("layer1", "layer1.0", False),
        ("fc", "", True),
        ("", "", True),
        ("", "fc", False),
    ],
)
def test_within_holds_the_scope_and_what_is_below_it(path: str, scope: str, expected: bool) -> None:
    assert within(path, scope) is expected


def test_common_scope_holds_every_scope() -> None:
    scopes = ["features.3.block.0.1", "features.3.block.1.0", "features.3.use_res"]
    scope = common_scope(scopes)
    assert scope == "features.3"
    assert all(within(s, scope) for s in scopes)

"""``fuse(model, example_inputs=...)`` on whole shipped models, as FuseOnExport calls it (tests/whole_models.py).

Every model keeps its class, the caller's model is left bit-for-bit as it was, and the fused model's continuous
outputs (the whole output, or a detector's backbone features and head outputs, whose detections may vary after
NMS) match the original's within float32's relative bound (1e-4). Every BatchNorm of these models follows a conv
or a linear layer, so none may be left and nothing reverted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import whole_models
from fx_lightning import fuse
from fx_lightning.fusion.counting import count_batch_norms
from fx_lightning.verify.compare import compare_trees


@dataclass
class Fused:
    built: whole_models.WholeModel
    fused: nn.Module
    state_before: dict[str, torch.Tensor]
    output: Any
    parts: Any


def _params() -> list[Any]:
    slow = pytest.mark.slow
    return [pytest.param(n, marks=() if n in whole_models.FAST else slow) for n in whole_models.BUILDERS]


@pytest.fixture(scope="module", params=_params())
def case(request: pytest.FixtureRequest) -> Fused:
    """One whole model fused once, shared by the tests below (module scope groups them by model)."""
    built = whole_models.build(request.param)
    state = {k: v.clone() for k, v in built.model.state_dict().items()}
    with torch.no_grad():
        output, parts = built.model(*built.example_inputs), built.parts(built.model)
    return Fused(built, fuse(built.model, example_inputs=built.example_inputs), state, output, parts)


def test_fuse_whole_model_keeps_class_and_leaves_original_untouched(case: Fused) -> None:
    model = case.built.model
    assert type(case.fused) is type(model)
    assert not case.fused.training
    after = model.state_dict()
    assert after.keys() == case.state_before.keys()
    changed = [k for k, v in case.state_before.items() if not torch.equal(v, after[k])]
    assert not changed, f"fuse changed the caller's model: {changed[:5]}"


def test_fuse_whole_model_matches_on_continuous_parts(case: Fused) -> None:
    with torch.no_grad():
        parts = compare_trees(case.parts, case.built.parts(case.fused))
        output = compare_trees(case.output, case.fused(*case.built.example_inputs))
    assert parts.passed, parts.describe()
    assert parts.max_rel <= 1e-4
    if case.built.post_processed:
        # Detections after NMS may differ in count where rounding flips a near-tied box; the form stays the same.
        assert not output.structure, output.structure
    else:
        assert output.passed, output.describe()


def test_fuse_whole_model_folds_every_batch_norm(case: Fused) -> None:
    name = case.built.name
    inputs = case.built.example_inputs
    before = count_batch_norms(lambda: case.built.model(*inputs), case.built.model)
    after = count_batch_norms(lambda: case.fused(*inputs), case.fused)
    assert before > 0
    report = case.fused.fusion_report
    assert (after, report.reverted) == (0, []), f"{name}: {before} -> {after} BatchNorms\n{report}"


def test_whole_models_build_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"whole_models.build\('resnet'\): no such model; choose one of"):
        whole_models.build("resnet")

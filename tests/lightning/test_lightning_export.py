"""lightning.export: the artifacts of one fusion through deploy.flow.export_and_verify, and what that function
takes from the Lightning layer (artifacts the caller made, int8 that fails alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from deploy_nets import NUM_CLASSES, make_case
from fx_lightning.deploy.export import Artifact
from fx_lightning.deploy.flow import ArtifactMismatchWarning, export_and_verify
from fx_lightning.fusion.probe import Call
from fx_lightning.lightning.export import StandIn, deploy_data, dynamic_batch, layout, takes_example


def accuracy() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")


def test_dynamic_batch_says_why_not() -> None:
    assert dynamic_batch(False, (torch.zeros(4, 3),)) == (False, "")
    assert dynamic_batch(True, (torch.zeros(4, 3),)) == (True, "")
    assert dynamic_batch(True, ([torch.zeros(3)],)) == (
        False,
        "its input is a list of tensors, which has no batch dimension to make dynamic",
    )
    assert dynamic_batch(True, (torch.zeros(1, 3),))[1] == (
        "it receives batches of 1 here, and a dynamic batch needs an example of 2 or more"
    )


def test_takes_example_only_the_forward_input_itself() -> None:
    x = torch.zeros(2, 3)
    assert takes_example(Call((x,)), x)
    assert takes_example(Call((x,)), (x,))
    assert not takes_example(Call((x.clone(),)), x)
    assert not takes_example(Call((x,), {"mask": x}), x)


def test_layout_compares_structure_and_shapes() -> None:
    a = {"logits": torch.zeros(2, 3), "n": 1}
    assert layout(a) == layout({"logits": torch.ones(2, 3), "n": 5})
    assert layout(a) != layout({"logits": torch.zeros(2, 4), "n": 1})
    assert layout(torch.zeros(2)) != layout((torch.zeros(2),))


def test_stand_in_runs_the_function_in_a_module_place() -> None:
    stand_in = StandIn(lambda x: x * 2)
    assert isinstance(stand_in, nn.Module)
    assert torch.equal(stand_in(torch.ones(2)), torch.full((2,), 2.0))


def test_export_and_verify_checks_the_callers_artifacts_with_the_written_ones(tmp_path: Path) -> None:
    case = make_case()
    reloaded = Artifact("ckpt", tmp_path / "deploy.ckpt", runtime="reloaded", runner=case.fused)
    report = export_and_verify(
        case.original,
        case.fused,
        case.example,
        tmp_path,
        case.batches,
        ["weights"],
        artifacts={"ckpt": reloaded},
        metric=accuracy(),
        latency_budget_s=0,
    )
    assert list(report.artifacts) == ["weights", "ckpt"]
    assert report.artifacts["ckpt"].runtime == "reloaded"
    assert report.artifacts["ckpt"].verification is not None
    assert report.artifacts["ckpt"].verification.num_samples == case.num_samples
    assert report.passed


def test_export_and_verify_callers_artifact_alone_without_formats(tmp_path: Path) -> None:
    case = make_case()
    wrong = Artifact("ckpt", tmp_path / "deploy.ckpt", runtime="reloaded", runner=lambda x: -case.fused(x))
    (tmp_path / "deploy.ckpt").write_bytes(b"")
    with pytest.warns(ArtifactMismatchWarning, match=r"the 'ckpt' artifact .* failed verification"):
        report = export_and_verify(
            case.original,
            case.fused,
            case.example,
            tmp_path,
            case.batches,
            [],
            artifacts={"ckpt": wrong},
            metric=accuracy(),
            latency_budget_s=0,
        )
    assert list(report.artifacts) == ["ckpt"]
    assert not report.passed
    assert (tmp_path / "deploy.FAILED.ckpt").is_file()


def test_export_and_verify_int8_failure_fails_only_int8_with_keep_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    case = make_case()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr("fx_lightning.deploy.flow.quantize_artifacts", broken)
    kwargs: dict[str, Any] = {
        "int8": {"formats": ["onnx"], "max_metric_drop": 1.0},
        "calibration": case.batches,
        "metric": accuracy(),
        "latency_budget_s": 0,
    }
    with pytest.raises(RuntimeError, match="quantizer exploded"):
        export_and_verify(case.original, case.fused, case.example, tmp_path / "a", case.batches, ["onnx"], **kwargs)
    with pytest.warns(ArtifactMismatchWarning, match=r"'onnx-int8' .* int8 could not be made: RuntimeError: quantiz"):
        report = export_and_verify(
            case.original, case.fused, case.example, tmp_path / "b", case.batches, ["onnx"], keep_going=True, **kwargs
        )
    assert report.artifacts["onnx"].passed
    assert report.artifacts["onnx-int8"].error == "int8 could not be made: RuntimeError: quantizer exploded"
    assert report.artifacts["onnx-int8"].path == tmp_path / "b" / "model.int8.onnx"


def test_deploy_data_per_network_when_several(tmp_path: Path) -> None:
    case = make_case()
    report = export_and_verify(
        case.original, case.fused, case.example, tmp_path, case.batches, ["weights"], latency_budget_s=0
    )
    assert deploy_data({"net": report}, several=False) == report.to_dict()
    both = deploy_data({"a": report, "b": report}, several=True)
    assert list(both["artifacts"]) == ["a.weights", "b.weights"]
    assert set(both["eager"]) == {"a", "b"}
    assert deploy_data({}, several=False) == {}

"""ONNX Runtime: the artifact verified at the optimisation level users deploy with; option errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deploy_nets import make_case
from fx_lightning.deploy.export import Artifact, write_artifacts
from fx_lightning.deploy.flow import verify_artifacts
from fx_lightning.deploy.formats import registered_exporters


def test_onnx_verified_at_the_optimisation_level_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    levels: list[Any] = []
    real_init = ort.InferenceSession.__init__

    def spy(self: Any, path: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> None:
        levels.append((sess_options.graph_optimization_level, sess_options.intra_op_num_threads))
        real_init(self, path, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", spy)
    case = make_case()
    written = write_artifacts(
        case.fused,
        case.example,
        tmp_path,
        ["onnx"],
        dynamic_batch=True,
        options={"onnx": {"optimization_level": "basic"}},
    )
    onnx = written["onnx"]
    assert onnx.runtime.endswith("CPU, ORT_ENABLE_BASIC")
    other = Artifact(
        "onnx",
        onnx.path,
        runtime="onnxruntime, disabled",
        options={"optimization_level": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "threads": 1},
    )
    basic = verify_artifacts(written, case.original, case.fused, case.batches, case.example, latency_budget_s=0)
    disabled = verify_artifacts(
        {"onnx": other}, case.original, case.fused, case.batches, case.example, latency_budget_s=0
    )
    assert levels == [
        (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, torch.get_num_threads()),
        (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 1),
    ]
    for report in (basic, disabled):
        result = report.artifacts["onnx"]
        assert result.passed
        assert result.verification is not None
        assert result.verification.num_samples == 25
        assert result.verification.metric_fused == pytest.approx(result.verification.metric_original, abs=1e-6)
        assert result.verification.max_abs_diff < 1e-4


def test_onnx_default_level_is_ort_default() -> None:
    assert registered_exporters()["onnx"].check({}) == {"optimization_level": "ORT_ENABLE_ALL", "threads": None}


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"onnx": {"optimization_level": "max"}},
            ValueError,
            r"\{'onnx': \{'optimization_level': 'max'\}\} is not an ONNX Runtime optimisation level\. Pass one of "
            r"\['disable_all', 'basic', 'extended', 'all'\]",
        ),
        ({"onnx": {"threads": 0}}, ValueError, r"\{'onnx': \{'threads': 0\}\} expects a positive integer"),
        ({"onnx": {"level": "basic"}}, ValueError, r"for 'onnx' name unknown option\(s\) \['level'\]"),
        ({"tflite": {}}, ValueError, r"has options for unknown format\(s\) \['tflite'\]\. Valid formats: \['pt2'"),
        ({"onnx": "basic"}, TypeError, r"expects a dict of per-format option dicts"),
    ],
)
def test_export_options_invalid_raise(tmp_path: Path, options: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        write_artifacts(nn.Linear(3, 2), (torch.randn(2, 3),), tmp_path, ["onnx"], options=options)
    assert list(tmp_path.iterdir()) == []


def test_onnx_level_names_accepted(tmp_path: Path) -> None:
    import onnxruntime as ort

    from fx_lightning.deploy.formats.onnx import check_onnx

    assert check_onnx({"optimization_level": "EXTENDED"})["optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert check_onnx({"optimization_level": "ORT_DISABLE_ALL"})["optimization_level"] == "ORT_DISABLE_ALL"
    level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert check_onnx({"optimization_level": level})["optimization_level"] == "ORT_ENABLE_BASIC"

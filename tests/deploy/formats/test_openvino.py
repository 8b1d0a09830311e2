"""OpenVINO IR: written from the torch.export program, verified in the CPU plugin; an optional extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deploy_nets import make_case
from fx_lightning.deploy.export import MissingExtraError, write_artifacts
from fx_lightning.deploy.flow import export_and_verify


def test_openvino_missing_names_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    case = make_case()
    with pytest.raises(MissingExtraError, match=r'needs openvino .*pip install "fx-lightning\[openvino\]"'):
        write_artifacts(case.fused, case.example, tmp_path, ["pt2", "openvino"])
    assert list(tmp_path.iterdir()) == []


def test_openvino_ir_verified_in_the_cpu_plugin(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    case = make_case()
    report = export_and_verify(
        case.original,
        case.fused,
        case.example,
        tmp_path,
        case.batches,
        ["openvino"],
        dynamic_batch=True,
        options={"openvino": {"threads": 1, "inference_precision": "f32"}},
        latency_budget_s=0.05,
    )
    result = report.artifacts["openvino"]
    assert result.passed
    assert result.path == tmp_path / "model.xml"
    assert (tmp_path / "model.bin").is_file()
    assert result.runtime.startswith("OpenVINO ")
    assert result.runtime.endswith("CPU, f32")
    assert result.verification is not None
    assert result.verification.num_samples == 25
    assert result.verification.max_abs_diff < 1e-4
    assert result.latency_ms is not None


def test_openvino_invalid_options_raise(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    case = make_case()
    with pytest.raises(ValueError, match=r"\{'openvino': \{'threads': 0\}\} expects a positive integer"):
        write_artifacts(case.fused, case.example, tmp_path, ["openvino"], options={"openvino": {"threads": 0}})
    with pytest.raises(ValueError, match=r"for 'openvino' name unknown option\(s\) \['device'\]"):
        write_artifacts(case.fused, case.example, tmp_path, ["openvino"], options={"openvino": {"device": "GPU"}})

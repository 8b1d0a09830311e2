"""deploy.check: its errors name the function the user called, verify_artifacts or export_and_verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy_nets import make_case
from fx_lightning.deploy.check import verify_artifacts
from fx_lightning.deploy.export import write_artifacts
from fx_lightning.deploy.flow import export_and_verify
from fx_lightning.deploy.int8.gate import quantize_artifacts
from fx_lightning.deploy.int8.options import Int8Options

INVALID = [
    pytest.param({"batches": []}, ValueError, r"\(batches=\.\.\.\) got no batches", id="no-batches"),
    pytest.param({"tolerance": "small"}, TypeError, r"\(tolerance='small'\) expects a number, got str", id="tolerance"),
    pytest.param({"latency_budget_s": -1}, ValueError, r"\(latency_budget_s=-1\) expects seconds >= 0", id="budget"),
    pytest.param({"max_batches": 0}, ValueError, r"\(max_batches=0\) expects a positive integer or None", id="cap"),
    pytest.param({"strict": "yes"}, TypeError, r"\(strict='yes'\) expects True or False", id="strict"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), INVALID)
def test_verify_artifacts_errors_name_verify_artifacts(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    case = make_case()
    written = write_artifacts(case.fused, case.example, tmp_path, ["weights"])
    call = {"batches": case.batches, "latency_budget_s": 0} | kwargs
    with pytest.raises(error, match=r"^verify_artifacts" + match):
        verify_artifacts(written, case.original, case.fused, example_inputs=case.example, **call)


@pytest.mark.parametrize(("kwargs", "error", "match"), INVALID)
def test_export_and_verify_errors_name_export_and_verify(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    case = make_case()
    call = {"batches": case.batches, "latency_budget_s": 0} | kwargs
    with pytest.raises(error, match=r"^export_and_verify" + match):
        export_and_verify(case.original, case.fused, case.example, tmp_path, formats=["weights"], **call)


def test_quantize_artifacts_without_calibration_batches_raises(tmp_path: Path) -> None:
    case = make_case()
    written = write_artifacts(case.fused, case.example, tmp_path, ["weights"])
    with pytest.raises(
        ValueError, match=r"^quantize_artifacts\(calibration=\.\.\.\) gave no batches: int8 calibration"
    ):
        quantize_artifacts(written, case.original, case.fused, [], case.batches, case.example, Int8Options())


def test_export_and_verify_without_calibration_batches_names_export_and_verify(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime.quantization")
    case = make_case()
    with pytest.raises(ValueError, match=r"^export_and_verify\(calibration=\.\.\.\) gave no batches: int8"):
        export_and_verify(
            case.original, case.fused, case.example, tmp_path, case.batches, ["weights"], int8={}, calibration=[]
        )

"""summary: the JSON report, the state a checkpoint keeps, and the warning or error each outcome calls for."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fx_lightning.lightning.options import FuseOptions
from fx_lightning.lightning.result import FuseResult, FuseState, Outcome
from fx_lightning.lightning.summary import jsonable, raise_or_warn, report_file, write_report
from fx_lightning.verify.verifier import VerificationResult


class Logger:
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []
        self.saved = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append(metrics)

    def save(self) -> None:
        self.saved += 1


def fake_trainer(*loggers: Any) -> Any:
    return SimpleNamespace(loggers=list(loggers), global_step=7, is_global_zero=True)


def mismatch(stage: str = "test", outcome: Outcome = Outcome.REVERTED) -> FuseResult:
    result = FuseResult(stage=stage, outcome=outcome)
    result.verification = VerificationResult(
        metric_original={"acc": 0.9},
        metric_fused={"acc": 0.5},
        max_abs_diff=0.4,
        top1_agreement=None,
        max_rel_diff=0.4,
        num_samples=10,
        tolerance=0.01,
        passed=False,
    )
    return result


def test_report_file_names_the_deploy_report_and_the_others() -> None:
    assert report_file("fit", ["fit", "test"]) == "fuse_report.json"
    assert report_file("predict", ["fit", "test"]) == "fuse_report.predict.json"


def test_write_report_writes_json_logs_and_returns_plain_data(tmp_path: Path) -> None:
    logger = Logger()
    result = FuseResult(stage="fit", outcome=Outcome.FUSED, report_path=str(tmp_path / "deep" / "fuse_report.json"))
    data = write_report(fake_trainer(logger), result, strict=False)
    assert json.loads((tmp_path / "deep" / "fuse_report.json").read_text()) == data
    assert data["outcome"] == "fused"
    assert logger.logged == [result.log_metrics()]
    assert logger.saved == 1


def test_write_report_unwritable_warns_or_raises_with_strict(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = FuseResult(stage="fit", report_path=str(blocker / "fuse_report.json"))
    with pytest.warns(UserWarning, match=r"FuseOnExport could not write its report to .*fuse_report.json"):
        write_report(fake_trainer(), result, strict=False)
    with pytest.raises(RuntimeError, match=r"FuseOnExport\(strict=True\) could not write its report to "):
        write_report(fake_trainer(), result, strict=True)


def test_raise_or_warn_failure_names_strict_and_the_step() -> None:
    result = FuseResult(stage="fit", outcome=Outcome.FAILED, error="fx_lightning.fuse: RuntimeError: boom")
    result.attributes = ["net"]
    with pytest.warns(UserWarning, match=r"FuseOnExport failed at the end of fit on \['net'\], in fx_lightning.fuse"):
        raise_or_warn(fake_trainer(), result, None, FuseOptions())
    with pytest.raises(RuntimeError, match=r"FuseOnExport\(strict=True\) failed at the end of fit on \['net'\]"):
        raise_or_warn(fake_trainer(), result, RuntimeError("boom"), FuseOptions(strict=True))


def test_raise_or_warn_export_error_names_export_formats() -> None:
    result = FuseResult(stage="fit", outcome=Outcome.FUSED, error="export failed: OSError: disk full")
    with pytest.warns(UserWarning, match=r"FuseOnExport: export failed: OSError: disk full; artifacts are missing"):
        raise_or_warn(fake_trainer(), result, None, FuseOptions())
    with pytest.raises(RuntimeError, match=r"FuseOnExport\(strict=True\) could not export .* choose other export_fo"):
        raise_or_warn(fake_trainer(), result, None, FuseOptions(strict=True))


@pytest.mark.parametrize(
    ("options", "outcome", "match"),
    [
        ({}, Outcome.REVERTED, r"FuseOnExport\(on_mismatch='revert'\): .* acc 0.9 \(original\) vs 0.5 \(fused\)"),
        ({"on_mismatch": "warn"}, Outcome.KEPT_DESPITE_MISMATCH, r"FuseOnExport\(on_mismatch='warn'\): .* anyway"),
    ],
)
def test_raise_or_warn_mismatch_warns_with_the_figures(options: dict[str, Any], outcome: Outcome, match: str) -> None:
    with pytest.warns(UserWarning, match=match):
        raise_or_warn(fake_trainer(), mismatch(outcome=outcome), None, FuseOptions(**options))


@pytest.mark.parametrize(
    ("options", "match"),
    [({"on_mismatch": "raise"}, r"FuseOnExport\(on_mismatch='raise'\)"), ({"strict": True}, r"FuseOnExport\(strict")],
)
def test_raise_or_warn_mismatch_raises_when_asked(options: dict[str, Any], match: str) -> None:
    with pytest.raises(RuntimeError, match=match + r".*failed verification before test: acc 0.9"):
        raise_or_warn(fake_trainer(), mismatch(), None, FuseOptions(**options))


def test_raise_or_warn_nothing_to_fuse_warns_with_the_notes() -> None:
    result = FuseResult(stage="test", outcome=Outcome.NO_BATCH_NORM, notes=["no BatchNorm in the children"])
    with pytest.warns(UserWarning, match=r"FuseOnExport found nothing to fuse before test: no BatchNorm"):
        raise_or_warn(fake_trainer(), result, None, FuseOptions())


def test_jsonable_plain_data_only() -> None:
    data = jsonable({"a": (1, torch.tensor([1.0, 2.0])), "b": math.nan, "c": Outcome.FAILED, "d": Path("x")})
    assert data == {"a": [1, [1.0, 2.0]], "b": "nan", "c": "failed", "d": "x"}
    json.dumps(data, allow_nan=False)


def test_fuse_state_round_trip_is_a_deep_copy() -> None:
    state = FuseState(history=[{"stage": "fit", "notes": ["a"]}])
    saved = state.to_dict()
    state.history[0]["notes"].append("b")
    assert saved == {"history": [{"stage": "fit", "notes": ["a"]}]}
    assert FuseState.from_dict(saved).history == saved["history"]
    assert FuseState.from_dict({}).history == []
    assert FuseState.from_dict({"history": [], "unknown": 1}).history == []


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], r"FuseOnExport.load_state_dict expects a dict, got list"),
        ({"history": "fit"}, r"FuseOnExport.load_state_dict expects 'history' to be a list of reports, got str"),
    ],
)
def test_fuse_state_rejects_what_is_not_a_state(data: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        FuseState.from_dict(data)

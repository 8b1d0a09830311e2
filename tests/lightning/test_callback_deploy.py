"""FuseOnExport checks each artifact in the runtime that runs it, over the verification data, and reports latency."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fx_lightning import FuseOnExport
from fx_lightning.lightning.cli import run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_deploy.yaml"
ENTRY_KEYS = {"path", "runtime", "verification", "latency_ms", "latency_ratio", "seconds", "error", "notes"}
VERIFICATION_KEYS = {"metric_original", "metric_artifact", "max_abs_diff", "num_samples", "passed"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"export_formats": ["onnx"], "export_options": {"onnx": {"optimization_level": "fast"}}},
            ValueError,
            r"FuseOnExport\(export_options=\{'onnx': \{'optimization_level': 'fast'\}\}\): .*Pass one of "
            r"\['disable_all', 'basic', 'extended', 'all'\]",
        ),
        (
            {"export_formats": ["pt2"], "export_options": {"onnx": {"optimization_level": "basic"}}},
            ValueError,
            r"has options for \['onnx'\], which export_formats=\['pt2'\] does not write\. Add the format",
        ),
        (
            {"export_options": ["onnx"]},
            TypeError,
            r"expects a dict of per-format option dicts, got list\. Pass e\.g\. export_options=",
        ),
        ({"deploy_latency_budget": -1}, ValueError, r"FuseOnExport\(deploy_latency_budget=-1\) expects seconds >= 0"),
    ],
)
def test_fuse_on_export_rejects_bad_export_options(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FuseOnExport(**kwargs)


def test_fuse_on_export_checks_artifacts_in_their_runtimes(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = FuseOnExport(
        export_dir=str(tmp_path / "out"),
        export_formats=["pt2", "onnx", "weights"],
        export_options={"onnx": {"optimization_level": "basic"}},
        deploy_latency_budget=0.1,
    )
    with caplog.at_level(logging.INFO):
        make_trainer(callbacks=[callback], limit_val_batches=2).fit(tiny_cnn(), datamodule=digits)

    report = json.loads((tmp_path / "out" / "fuse_report.json").read_text())
    assert {"artifacts", "eager", "latency", "verification", "outcome", "reports", "seconds"} <= set(report)
    assert list(report["artifacts"]) == ["pt2", "onnx", "weights"]
    for entry in report["artifacts"].values():
        assert set(entry) == ENTRY_KEYS
        assert set(entry["verification"]) >= VERIFICATION_KEYS
        assert entry["verification"]["passed"]
        assert entry["verification"]["num_samples"] == 256  # the two validation batches the network was verified on
        assert entry["latency_ms"] > 0
    assert report["artifacts"]["onnx"]["runtime"].endswith("ORT_ENABLE_BASIC")
    assert set(report["eager"]) == {"unfused", "fused"}
    assert report["latency"]["budget_s"] == 0.1
    assert set(callback.last_result.artifacts) == {"pt2", "onnx", "weights"}
    assert "deploy artifacts, verified on 256 samples against the original" in caplog.text
    assert "onnx     onnxruntime" in str(callback.last_result)


@pytest.mark.slow
def test_digits_deploy_config_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config writes under runs/, relative to the working directory
    cli: Any = run(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path / "dd")])
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FuseOnExport))
    report = json.loads(Path(callback.last_result.report_path).read_text())
    assert list(report["artifacts"]) == ["pt2", "onnx", "aoti", "weights", "ckpt"]
    for fmt, entry in report["artifacts"].items():
        assert entry["verification"]["passed"], fmt
        assert entry["verification"]["num_samples"] == 270, fmt  # the digits validation split
        assert entry["latency_ms"] > 0, fmt
    assert "deploy artifacts, verified on 270 samples" in str(callback.last_result)


def test_a_test_after_fit_does_not_overwrite_the_deploy_report(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    callback = FuseOnExport(
        export_dir=str(tmp_path / "out"), export_formats=["weights"], export_stages=["fit"], deploy_latency_budget=0
    )
    trainer = make_trainer(callbacks=[callback], limit_val_batches=1, limit_test_batches=1)
    model = tiny_cnn()
    trainer.fit(model, datamodule=digits)
    trainer.test(model, datamodule=digits)
    deploy = json.loads((tmp_path / "out" / "fuse_report.json").read_text())
    tested = json.loads((tmp_path / "out" / "fuse_report.test.json").read_text())
    assert (deploy["stage"], tested["stage"]) == ("fit", "test")
    assert list(deploy["artifacts"]) == ["weights"]
    assert deploy["artifacts"]["weights"]["verification"]["passed"]
    assert tested["artifacts"] == {}
    assert callback.history[1]["report_path"] == str(tmp_path / "out" / "fuse_report.test.json")

"""scripts/deploy_chart.py: a report's artifacts drawn as latency ratios with the metric beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scripts_loader import load_script

chart = load_script("deploy_chart.py")


def report(onnx_passed: bool = True) -> dict[str, Any]:
    def entry(ratio: float, passed: bool = True) -> dict[str, Any]:
        return {
            "path": "m",
            "runtime": "r",
            "latency_ms": 2.0 * ratio,
            "latency_ratio": ratio,
            "seconds": 1.0,
            "verification": {
                "metric_original": {"MulticlassAccuracy": 0.9},
                "metric_artifact": {"MulticlassAccuracy": 0.9 if passed else 0.1},
                "max_abs_diff": 1e-6,
                "num_samples": 8,
                "passed": passed,
            },
        }

    return {
        "artifacts": {"pt2": entry(1.1), "onnx": entry(0.4, onnx_passed), "aoti": entry(0.7)},
        "eager": {
            "unfused": {"latency_ms": 2.0, "latency_ratio": 1.0},
            "fused": {"latency_ms": 1.8, "latency_ratio": 0.9},
        },
        "latency": {"threads": 2, "batch_size": 8},
    }


def test_chart_rows_list_eager_networks_then_artifacts() -> None:
    rows = chart.chart_rows(report(onnx_passed=False))
    assert [r["label"] for r in rows] == ["unfused (eager)", "fused (eager)", "pt2", "onnx", "aoti"]
    assert rows[3] == {"label": "onnx", "ratio": 0.4, "ms": 0.8, "metric": "MulticlassAccuracy 0.1000", "passed": False}


def test_deploy_chart_script_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "fuse_report.json"
    source.write_text(json.dumps(report(onnx_passed=False)))
    chart.main([str(source), str(tmp_path / "charts" / "deploy.png")])
    out = tmp_path / "charts" / "deploy.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deploy_chart_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match=r"deploy_chart: the report has no 'artifacts' entry \(got keys \['outcome'\]\)"
    ):
        chart.render({"outcome": "fused"}, tmp_path / "a.png")
    untimed = {"artifacts": {"pt2": {"latency_ratio": None, "verification": {"passed": True}}}}
    with pytest.raises(ValueError, match=r"no artifact in the report has a latency_ratio; verify the artifacts with"):
        chart.render(untimed, tmp_path / "a.png")
    monkeypatch.setattr(chart.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r'needs matplotlib\. Install the plot extra: pip install "fx-lig'):
        chart.render(report(), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(SystemExit):
        chart.main([str(tmp_path / "missing.json"), str(tmp_path / "a.png")])

"""``deploy_table``: its title, columns and rows (eager, float and int8 artifacts), and the error without artifacts."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from fx_lightning.deploy.table import deploy_table


def _row(runtime: str, acc: float, diff: Any, passed: bool, latency: Any, ratio: Any, samples: int = 8) -> dict:
    return {
        "path": "m",
        "runtime": runtime,
        "latency_ms": latency,
        "latency_ratio": ratio,
        "verification": {
            "metric_original": {"acc": 0.9, "f1": 0.8},
            "metric_artifact": {"acc": acc, "f1": 0.75},
            "max_abs_diff": diff,
            "num_samples": samples,
            "passed": passed,
        },
    }


def _split(table: str) -> list[list[str]]:
    """The rows under the title, cut into cells (cells are separated by at least two spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[1:]]


def test_deploy_table_title_names_the_samples_and_the_original_metric() -> None:
    table = deploy_table({"artifacts": {"pt2": _row("torch.export.load", 0.9, 1e-6, True, 1.0, 0.5)}})
    assert (
        table.splitlines()[0] == "deploy artifacts, verified on 8 samples against the original (acc 0.9000, f1 0.8000)"
    )


def test_deploy_table_columns_and_one_row_per_artifact_in_order() -> None:
    report = {
        "artifacts": {
            "pt2": _row("torch.export.load", 0.9, 1e-6, True, 1.0, 0.5),
            "onnx": _row("onnxruntime", 0.85, 0.25, False, None, float("nan")),
        }
    }
    rows = _split(deploy_table(report))
    assert rows[0] == ["format", "runtime", "acc", "f1", "max abs diff", "passed", "latency ms", "ratio"]
    assert rows[1] == ["pt2", "torch.export.load", "0.9000", "0.7500", "1.00e-06", "yes", "1.000", "0.500"]
    assert rows[2] == ["onnx", "onnxruntime", "0.8500", "0.7500", "2.50e-01", "NO", "-", "-"]
    assert len(rows) == 3


def test_deploy_table_columns_are_aligned() -> None:
    report = {
        "artifacts": {
            "a_long_format_name": _row("rt", 0.9, 0.0, True, 12.345, 1.0),
            "w": _row("runtime two", 0.9, 0, False, 1, 1),
        }
    }
    header, *rows = deploy_table(report).splitlines()[1:]
    for row, runtime, passed in zip(rows, ["rt", "runtime two"], ["yes", "NO"]):
        assert row.index(f"  {runtime}  ") + 2 == header.index("runtime")
        assert row.index(f"  {passed}  ") + 2 == header.index("passed")


def test_deploy_table_eager_rows_come_first() -> None:
    report = {
        "eager": {
            "unfused": {"latency_ms": 2.0, "latency_ratio": 1.0},
            "fused": {"latency_ms": 1.5, "latency_ratio": 0.75},
        },
        "artifacts": {"pt2": _row("torch.export.load", 0.9, 1e-6, True, 1.0, 0.5)},
    }
    rows = _split(deploy_table(report))
    assert rows[1] == ["unfused", "torch eager", "2.000", "1.000"]
    assert rows[2] == ["fused", "torch eager", "1.500", "0.750"]
    assert rows[3][0] == "pt2"


def test_deploy_table_leaves_out_eager_networks_without_latency() -> None:
    report = {"eager": {"fused": {"latency_ms": None}}, "artifacts": {"pt2": _row("rt", 0.9, 0.0, True, 1.0, 0.5)}}
    assert [row[0] for row in _split(deploy_table(report))] == ["format", "pt2"]


def test_deploy_table_int8_rows_add_their_columns() -> None:
    int8 = _row("onnxruntime int8", 0.88, 0.01, True, 0.4, 0.2)
    int8 |= {"base": "onnx", "latency_ratio_base": 0.4, "int8": {"float_layers": ["fc", "head"], "calibration_s": 2.34}}
    report = {"artifacts": {"onnx": _row("onnxruntime", 0.9, 1e-6, True, 1.0, 0.5), "onnx_int8": int8}}
    rows = _split(deploy_table(report))
    assert rows[0][-3:] == ["vs float", "float layers", "calib s"]
    assert rows[1] == ["onnx", "onnxruntime", "0.9000", "0.7500", "1.00e-06", "yes", "1.000", "0.500"]  # empty cells
    assert rows[2] == [
        "onnx_int8",
        "onnxruntime int8",
        "0.8800",
        "0.7500",
        "1.00e-02",
        "yes",
        "0.400",
        "0.200",
        "0.400",
        "2",
        "2.3",
    ]


def test_deploy_table_int8_row_without_details_shows_dashes() -> None:
    int8 = _row("rt", 0.9, 0.0, True, 1.0, 0.5) | {"base": "onnx"}
    rows = _split(deploy_table({"artifacts": {"onnx_int8": int8}}))
    assert rows[1][-3:] == ["-", "-", "-"]


def test_deploy_table_lists_several_sample_counts() -> None:
    report = {"artifacts": {"a": _row("r", 0.9, 0.0, True, 1.0, 0.5, 8), "b": _row("r", 0.9, 0.0, True, 1.0, 0.5, 16)}}
    assert "verified on [8, 16] samples" in deploy_table(report).splitlines()[0]


def test_deploy_table_without_verification_shows_dashes_and_no_metric() -> None:
    report = {"artifacts": {"pt2": {"runtime": "torch.export.load", "latency_ms": math.inf}}}
    table = deploy_table(report)
    assert table.splitlines()[0] == "deploy artifacts, none verified (none could be loaded and run)"
    assert _split(table) == [
        ["format", "runtime", "max abs diff", "passed", "latency ms", "ratio"],
        ["pt2", "torch.export.load", "-", "NO", "-", "-"],
    ]


def test_deploy_table_reads_a_report_loaded_from_json() -> None:
    report = {"artifacts": {"pt2": _row("torch.export.load", 0.9, 1e-6, True, 1.0, 0.5)}}
    assert deploy_table(json.loads(json.dumps(report))) == deploy_table(report)


@pytest.mark.parametrize(
    ("report", "got"),
    [
        ({"formats": ["pt2"], "passed": True}, r"keys \['formats', 'passed'\]"),
        ({"artifacts": ["pt2"]}, r"keys \['artifacts'\]"),
        ([("artifacts", {})], "list"),
        ("fuse_report.json", "str"),
    ],
)
def test_deploy_table_without_artifacts_raises(report: Any, got: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"^deploy_table\(report\) expects a dict with an 'artifacts' entry \(DeployReport\.to_dict\(\) or a "
        rf"fuse_report\.json loaded with json\.load\), got {got}\.$",
    ):
        deploy_table(report)

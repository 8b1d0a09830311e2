"""int8 artifacts: ONNX Runtime static quantization of the float ONNX file, calibrated on training batches and
gated by the task metric, with layers kept in float while over budget."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fx_lightning import FuseOnExport, fuse
from fx_lightning.artifacts import ArtifactMismatchWarning, export_and_verify
from fx_lightning.int8 import Int8Options, int8_options
from fx_lightning.runtimes import MissingExtraError

pytest.importorskip("onnxruntime.quantization")


def test_fuse_on_export_writes_an_int8_onnx_artifact_checked_against_its_budget(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    model = tiny_cnn(width=8)
    callback = FuseOnExport(
        export_dir=str(tmp_path / "out"),
        export_formats=["pt2"],  # onnx is written too: the int8 file is made from it
        int8={"calibration_batches": 2, "max_metric_drop": 0.05},
        deploy_latency_budget=0.2,
    )
    make_trainer(callbacks=[callback], limit_val_batches=2).fit(model, datamodule=digits)

    report = json.loads((tmp_path / "out" / "fuse_report.json").read_text())
    assert list(report["artifacts"]) == ["pt2", "onnx", "onnx-int8"]
    entry = report["artifacts"]["onnx-int8"]
    assert entry["path"] == str(tmp_path / "out" / "net.int8.onnx")
    assert entry["base"] == "onnx"
    assert entry["runtime"].endswith("int8 QDQ")
    verification = entry["verification"]
    assert verification["passed"], entry
    assert verification["num_samples"] == 256
    assert verification["tolerance"] == 0.05
    drop = verification["metric_drop"]["MulticlassAccuracy"]
    assert abs(drop) <= 0.05
    assert drop == pytest.approx(
        verification["metric_original"]["MulticlassAccuracy"] - verification["metric_artifact"]["MulticlassAccuracy"]
    )
    assert verification["max_abs_diff"] > 1e-4  # int8, not a copy of the float file
    assert entry["latency_ms"] > 0 and entry["latency_ratio"] > 0 and entry["latency_ratio_base"] > 0
    int8 = entry["int8"]
    assert int8["calibration_batches"] == 2 and int8["calibration_samples"] == 256
    assert int8["calibration_s"] > 0
    assert int8["layers"] == 4  # three convolutions and the linear head
    assert int8["float_layers"] == [] and len(int8["attempts"]) == 1
    assert set(callback.last_result.artifacts) == {"pt2", "onnx", "onnx-int8"}
    table = callback.last_result.deploy_table
    assert "vs float" in table and "onnx-int8" in table

    # the file is a QDQ model: ONNX Runtime runs it on any batch size, close to the float file
    import onnx
    import onnxruntime as ort

    ops = {node.op_type for node in onnx.load(entry["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = next(iter(digits.val_dataloader()))[0][:5].numpy()
    outputs = []
    for path in (report["artifacts"]["onnx"]["path"], entry["path"]):
        session = ort.InferenceSession(path)
        outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    float_out, int8_out = outputs
    assert int8_out.shape == (5, 10)
    assert np.abs(int8_out - float_out).max() < 0.5 * np.abs(float_out).max()

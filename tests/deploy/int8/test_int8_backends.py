"""The int8 backend registry: one registration adds an int8 format, checked and gated like the built-in ones."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from torchmetrics.classification import MulticlassAccuracy

from deploy_nets import NUM_CLASSES, make_case
from fx_lightning.deploy.export import Artifact
from fx_lightning.deploy.flow import export_and_verify
from fx_lightning.deploy.int8 import (
    BACKENDS,
    Int8Backend,
    Int8Options,
    int8_options,
    register_int8_backend,
    registered_int8_backends,
    unregister_int8_backend,
)


class CopyQuantizer:
    """A stand-in quantizer: the int8 file is a copy of the float one, so it keeps the metric exactly."""

    def __init__(self, base: Artifact, calibration: list[tuple[Any, ...]]) -> None:
        self.base = base
        self.calibration = calibration
        self.layers = ["only"]
        self.notes: list[str] = []
        self.calibration_s = 0.0
        self.closed = False

    @property
    def num_samples(self) -> int:
        return sum(args[0].shape[0] for args in self.calibration)

    def facts(self) -> dict[str, Any]:
        return {"calibration_method": "copy"}

    def label(self, layer: str) -> str:
        return layer

    def write(self, path: Path, float_layers: Sequence[str] = ()) -> Path:
        shutil.copyfile(self.base.path, path)
        return path

    def sensitivity(self) -> list[tuple[str, float]]:
        return [("only", 0.0)]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def pt2_backend() -> Iterator[list[CopyQuantizer]]:
    """An int8 backend of the ``pt2`` format, registered for the test only; yields the quantizers it made."""
    made: list[CopyQuantizer] = []

    def make(base: Artifact, fused: Any, inputs: Any, calibration: Any, options: Int8Options) -> CopyQuantizer:
        made.append(CopyQuantizer(base, calibration))
        return made[-1]

    register_int8_backend(Int8Backend("pt2", "int8 copy", lambda: None, make, calibration_methods=("copy",)))
    try:
        yield made
    finally:
        unregister_int8_backend("pt2")


def test_builtin_backends_register_in_order() -> None:
    assert list(registered_int8_backends()) == ["onnx", "aoti"]
    assert registered_int8_backends()["onnx"].how == "int8 QDQ"
    assert "minmax" in registered_int8_backends()["aoti"].calibration_methods


def test_one_registration_adds_an_int8_format(tmp_path: Path, pt2_backend: list[CopyQuantizer]) -> None:
    case = make_case()
    options = int8_options({"formats": ["pt2"], "calibration_method": "copy", "calibration_batches": 2}, "test")
    assert options is not None
    report = export_and_verify(
        case.original,
        case.fused,
        case.example,
        tmp_path,
        case.batches,
        formats=["pt2"],
        int8=options,
        calibration=case.batches,
        metric=MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"),
        latency_budget_s=0,
    )
    assert list(report.artifacts) == ["pt2", "pt2-int8"]
    entry = report.artifacts["pt2-int8"]
    assert entry.passed, entry.failure()
    assert entry.path == tmp_path / "model.int8.pt2"
    assert entry.runtime.endswith(", int8 copy")
    assert entry.base == "pt2"
    assert entry.details["int8"]["calibration_method"] == "copy"
    # two batches of 10 in chunks of the fixed batch size 4 (the example's), the short last chunks dropped
    assert entry.details["int8"]["calibration_samples"] == 16
    assert len(pt2_backend) == 1
    assert pt2_backend[0].closed


def test_register_int8_backend_rejects_a_taken_name() -> None:
    with pytest.raises(
        ValueError, match=r"register_int8_backend\('onnx', \.\.\.\) failed: a quantization backend named 'onnx'"
    ):
        register_int8_backend(BACKENDS["onnx"])


def test_register_int8_backend_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match=r"register_int8_backend\(backend=\.\.\.\) expects an .*Int8Backend, got dict"):
        register_int8_backend({"format": "pt2"})  # type: ignore[arg-type]


def test_unregister_int8_backend_of_an_unknown_format_raises() -> None:
    with pytest.raises(KeyError, match=r"unregister_int8_backend\('tflite'\): no such quantization backend"):
        unregister_int8_backend("tflite")


def test_unregistered_format_is_rejected_by_the_options() -> None:
    with pytest.raises(ValueError, match=r"export_and_verify\(int8=\.\.\.\): formats=\['pt2'\] names no int8 format"):
        int8_options({"formats": ["pt2"]}, "export_and_verify")


def test_calibration_methods_come_from_the_backends(pt2_backend: list[CopyQuantizer]) -> None:
    with pytest.raises(
        ValueError,
        match=r"calibration_method='kl' is not one of \['minmax', 'entropy', 'percentile', 'distribution', 'copy'\] "
        r"\('onnx' calibrates .*; 'aoti' calibrates \['minmax'\]; 'pt2' calibrates \['copy'\]\)",
    ):
        int8_options({"calibration_method": "kl"}, "FuseOnExport")

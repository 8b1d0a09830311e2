"""The format registry: one exporter per format, read by validation, writing and verification."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from deploy_nets import EXAMPLE_BATCH, make_case
from fx_lightning.deploy.export import FORMATS, export_artifacts, write_artifacts
from fx_lightning.deploy.flow import verify_artifacts
from fx_lightning.deploy.formats import (
    Exporter,
    ExportJob,
    LoadContext,
    register_exporter,
    registered_exporters,
    unregister_exporter,
)
from fx_lightning.deploy.formats.base import no_options


def test_registry_holds_one_exporter_per_format_in_write_order() -> None:
    exporters = registered_exporters()
    assert list(exporters)[:5] == ["pt2", "onnx", "aoti", "openvino", "weights"]
    assert FORMATS == ("pt2", "onnx", "aoti", "openvino", "weights")
    assert all(name == exporter.name for name, exporter in exporters.items())
    assert [name for name, e in exporters.items() if not e.traced] == ["weights"]


def _write_copy(job: ExportJob, stem: Path, options: Mapping[str, Any]) -> Path:
    path = stem.with_name(stem.name + ".copy.pt")
    torch.save({k: v.detach().cpu() for k, v in job.module.state_dict().items()}, path)
    return path


def _load_copy(path: Path, context: LoadContext) -> Any:
    module = copy.deepcopy(context.module)
    module.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return module


@pytest.fixture
def copy_format() -> Iterator[Exporter]:
    exporter = Exporter(
        name="copy",
        write=_write_copy,
        load=_load_copy,
        runtime=lambda options: "torch eager copy",
        check=no_options("copy"),
        traced=False,
    )
    register_exporter(exporter)
    yield exporter
    unregister_exporter("copy")


def test_registered_format_is_written_validated_and_verified(copy_format: Exporter, tmp_path: Path) -> None:
    case = make_case()
    paths = export_artifacts(case.fused, case.example, tmp_path, formats=["copy", "pt2"])
    assert list(paths) == ["pt2", "copy"]  # registry order
    assert paths["copy"] == tmp_path / "model.copy.pt"
    report = verify_artifacts(
        write_artifacts(case.fused, case.example, tmp_path / "v", ["copy"]),
        case.original,
        case.fused,
        case.batches,
        case.example,
        latency_budget_s=0,
    )
    assert report.artifacts["copy"].runtime == "torch eager copy"
    assert report.artifacts["copy"].passed
    with pytest.raises(ValueError, match=r"export options for 'copy' name unknown option\(s\) \['x'\]\. It takes no"):
        export_artifacts(case.fused, case.example, tmp_path, formats=["copy"], options={"copy": {"x": 1}})


def test_registry_errors(copy_format: Exporter) -> None:
    with pytest.raises(ValueError, match=r"a format named 'copy' is already registered\. Registered: \['pt2', "):
        register_exporter(copy_format)
    with pytest.raises(
        TypeError, match=r"register_exporter\(exporter=...\) expects an fx_lightning\.deploy\.formats\.Exporter"
    ):
        register_exporter("onnx")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=r"unregister_exporter\('tflite'\): no such format"):
        unregister_exporter("tflite")


def test_traced_artifact_with_fixed_shapes_records_its_batch_size(tmp_path: Path) -> None:
    case = make_case()
    written = write_artifacts(case.fused, case.example, tmp_path, ["pt2", "weights"])
    assert written["pt2"].batch_size == EXAMPLE_BATCH
    assert written["weights"].batch_size is None  # a state dict runs any batch size
    assert written["pt2"].seconds > 0

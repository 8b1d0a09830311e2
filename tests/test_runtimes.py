"""The format registry and its runtimes: AOTInductor packages (one compile per module), ONNX Runtime levels."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from deploy_nets import EXAMPLE_BATCH, NUM_CLASSES, Case, make_case
from fx_lightning.artifacts import ArtifactMismatchWarning, verify_artifacts
from fx_lightning.export import FORMATS, Artifact, export_artifacts, write_artifacts
from fx_lightning.runtimes import (
    Exporter,
    ExportJob,
    LoadContext,
    MissingCompilerError,
    register_exporter,
    registered_exporters,
    unregister_exporter,
)
from fx_lightning.runtimes.base import no_options


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------------------- the registry


def test_registry_holds_one_exporter_per_format_in_write_order() -> None:
    exporters = registered_exporters()
    assert list(exporters)[:4] == ["pt2", "onnx", "aoti", "weights"]
    assert FORMATS == ("pt2", "onnx", "aoti", "weights")
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
    with pytest.raises(TypeError, match=r"register_exporter\(exporter=...\) expects an fx_lightning.runtimes.Exporter"):
        register_exporter("onnx")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=r"unregister_exporter\('tflite'\): no such format"):
        unregister_exporter("tflite")


# ----------------------------------------------------------------------------------------- AOTInductor


@pytest.fixture(scope="module")
def aoti_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Artifact]:
    """The small CNN compiled once for the module, with a dynamic batch dimension (example batch of 4)."""
    case = make_case()
    directory = tmp_path_factory.mktemp("aoti")
    written = write_artifacts(case.fused, case.example, directory, ["aoti"], dynamic_batch=True)
    return case, written["aoti"]


def test_aoti_package_reloads_and_takes_other_batch_sizes(aoti_case: tuple[Case, Artifact]) -> None:
    case, artifact = aoti_case
    assert artifact.path.name == "model.aoti.pt2"
    assert artifact.batch_size is None  # dynamic
    assert "freezing=True" in artifact.runtime
    assert artifact.options == {"inductor_configs": {"freezing": True}}
    compiled = torch._inductor.aoti_load_package(str(artifact.path))  # independent of our loader
    for batch in (EXAMPLE_BATCH, 7, 2):
        x = torch.randn(batch, 1, 6, 6)
        with torch.no_grad():
            out = compiled(x)
            assert out.shape == (batch, 5)
            assert max_diff(out, case.fused(x)) < 1e-5


def test_aoti_package_verified_with_the_task_metric(aoti_case: tuple[Case, Artifact]) -> None:
    case, artifact = aoti_case
    accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
    report = verify_artifacts(
        {"aoti": artifact}, case.original, case.fused, case.batches, case.example, metric=accuracy, latency_budget_s=0.1
    )
    result = report.artifacts["aoti"]
    assert result.passed
    assert result.verification is not None
    assert result.verification.num_samples == case.num_samples == 25  # batches of 10, 10, 5; example of 4
    assert result.verification.metric_original == pytest.approx({"MulticlassAccuracy": 0.8})
    assert result.verification.metric_fused == pytest.approx(result.verification.metric_original, abs=1e-6)
    assert result.verification.max_abs_diff < 1e-4
    assert result.latency_ms is not None
    assert result.latency_ms > 0
    assert result.notes == []  # any batch size runs as is
    assert report.announced() == {"aoti": artifact.path}


def test_aoti_without_a_compiler_names_what_is_missing(tmp_path: Path) -> None:
    case = make_case()
    options = {"aoti": {"inductor_configs": {"cpp.cxx": ("no-such-c++",)}}}
    with pytest.raises(
        MissingCompilerError,
        match=r"formats=\['aoti'\]\) needs a C\+\+ compiler to build the AOTInductor package, and none works here: "
        r"tried \['no-such-c\+\+'\] \(torch._inductor.config.cpp.cxx; \$CXX=.*\)\. Install one \(e.g. apt-get "
        r"install g\+\+\)",
    ) as info:
        write_artifacts(case.fused, case.example, tmp_path, ["pt2", "aoti"], options=options)
    assert isinstance(info.value, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # checked before anything is written


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"aoti": {"inductor_configs": {"no_such_setting": 1}}},
            ValueError,
            r"'inductor_configs': \{'no_such_setting': 1\}\}\} names a setting torch .* does not have",
        ),
        ({"aoti": {"inductor_configs": [1]}}, ValueError, r"expects a dict of torch._inductor.config settings"),
        ({"aoti": {"freezing": True}}, ValueError, r"unknown option\(s\) \['freezing'\]\. It accepts \['inductor_"),
    ],
)
def test_aoti_invalid_options_raise(tmp_path: Path, options: dict, error: type[Exception], match: str) -> None:
    case = make_case()
    with pytest.raises(error, match=match):
        write_artifacts(case.fused, case.example, tmp_path, ["aoti"], options=options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_aoti_option_that_changes_results_is_not_announced(tmp_path: Path) -> None:
    """Inductor's own fault injection miscompiles ReLU: the package compiles and runs, with other results."""
    case = make_case()
    options = {"aoti": {"inductor_configs": {"cpp.inject_relu_bug_TESTING_ONLY": "accuracy"}}}
    written = write_artifacts(case.fused, case.example, tmp_path, ["aoti"], dynamic_batch=True, options=options)
    with pytest.warns(
        ArtifactMismatchWarning,
        match=r"the 'aoti' artifact .*model.aoti.pt2 \(run by AOTInductor .*inject_relu_bug_TESTING_ONLY.*\) failed "
        r"verification over 25 samples: MulticlassAccuracy original \S+, artifact \S+ \(\|diff\| \S+, tolerance "
        r"0.001\); max abs diff \S+\. It is kept as .*model.aoti.FAILED.pt2 and not announced",
    ):
        report = verify_artifacts(written, case.original, case.fused, case.batches, case.example, latency_budget_s=0)
    assert report.announced() == {}
    assert not (tmp_path / "model.aoti.pt2").exists()
    assert (tmp_path / "model.aoti.FAILED.pt2").is_file()


# ----------------------------------------------------------------------------------------- ONNX Runtime


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


def test_traced_artifact_with_fixed_shapes_records_its_batch_size(tmp_path: Path) -> None:
    case = make_case()
    written = write_artifacts(case.fused, case.example, tmp_path, ["pt2", "weights"])
    assert written["pt2"].batch_size == EXAMPLE_BATCH
    assert written["weights"].batch_size is None  # a state dict runs any batch size
    assert written["pt2"].seconds > 0


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

    from fx_lightning.runtimes.onnx import check_onnx

    assert check_onnx({"optimization_level": "EXTENDED"})["optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert check_onnx({"optimization_level": "ORT_DISABLE_ALL"})["optimization_level"] == "ORT_DISABLE_ALL"
    level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert check_onnx({"optimization_level": level})["optimization_level"] == "ORT_ENABLE_BASIC"

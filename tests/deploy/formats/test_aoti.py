"""AOTInductor packages: compiled once per module with a dynamic batch; reload, task metric, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from deploy_nets import EXAMPLE_BATCH, NUM_CLASSES, Case, make_case
from fx_lightning.deploy.export import Artifact, write_artifacts
from fx_lightning.deploy.flow import ArtifactMismatchWarning, verify_artifacts
from fx_lightning.deploy.formats import MissingCompilerError


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


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
        r"0.001, missed by \S+\); max abs diff \S+, max rel diff \S+\. It is kept as .*model.aoti.FAILED.pt2 "
        r"and not announced",
    ):
        report = verify_artifacts(written, case.original, case.fused, case.batches, case.example, latency_budget_s=0)
    assert report.announced() == {}
    assert not (tmp_path / "model.aoti.pt2").exists()
    assert (tmp_path / "model.aoti.FAILED.pt2").is_file()

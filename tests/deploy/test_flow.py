"""verify_artifacts: each artifact checked in its runtime with the task metric, timed, reported; failures renamed."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from deploy_nets import EXAMPLE_BATCH, NUM_CLASSES, Case, make_case
from fx_lightning.deploy.export import Artifact, write_artifacts
from fx_lightning.deploy.flow import (
    ArtifactMismatchWarning,
    DeployReport,
    deploy_table,
    export_and_verify,
    failed_path,
    verify_artifacts,
)

ARTIFACT_KEYS = {"path", "runtime", "verification", "latency_ms", "latency_ratio", "seconds", "error", "notes"}
VERIFICATION_KEYS = {"metric_original", "metric_artifact", "max_abs_diff", "num_samples", "passed"}


def accuracy() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, dict[str, Artifact]]:
    """pt2 (fixed batch of 4), onnx and weights of the small CNN, written once for the module."""
    case = make_case()
    directory = tmp_path_factory.mktemp("written")
    return case, write_artifacts(case.fused, case.example, directory, ["pt2", "onnx", "weights"])


def copied(artifacts: dict[str, Artifact], directory: Path) -> dict[str, Artifact]:
    """The artifacts copied to ``directory``, so that a test may rename them."""
    out = {}
    for fmt, artifact in artifacts.items():
        target = directory / artifact.path.name
        shutil.copy(artifact.path, target)
        out[fmt] = dataclasses.replace(artifact, path=target)
    return out


# ----------------------------------------------------------------------------------------- the report


def test_verify_artifacts_report_schema(written: tuple[Case, dict[str, Artifact]], tmp_path: Path) -> None:
    case, artifacts = written
    report = verify_artifacts(
        copied(artifacts, tmp_path),
        case.original,
        case.fused,
        case.batches,
        case.example,
        metric=accuracy(),
        latency_budget_s=0.2,
    )
    assert isinstance(report, DeployReport)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # plain, strict JSON
    assert set(data) == {"artifacts", "eager", "latency"}
    assert list(data["artifacts"]) == ["pt2", "onnx", "weights"]
    for fmt, entry in data["artifacts"].items():
        assert set(entry) == ARTIFACT_KEYS
        assert set(entry["verification"]) >= VERIFICATION_KEYS
        assert entry["path"] == str(tmp_path / artifacts[fmt].path.name)
        assert entry["verification"]["passed"] is True
        assert entry["verification"]["num_samples"] == case.num_samples == 25
        assert entry["verification"]["metric_original"] == pytest.approx({"MulticlassAccuracy": 0.8})
        assert entry["verification"]["metric_artifact"] == pytest.approx({"MulticlassAccuracy": 0.8})
        assert entry["verification"]["max_abs_diff"] < 1e-4
        assert entry["latency_ms"] > 0
        assert entry["latency_ratio"] > 0
        assert entry["seconds"] > 0
        assert entry["error"] is None
    assert data["artifacts"]["onnx"]["runtime"].startswith("onnxruntime ")
    assert data["artifacts"]["pt2"]["notes"][0].startswith("written with a fixed batch size of 4: other batch sizes")
    assert data["eager"]["unfused"]["latency_ratio"] == 1.0
    assert data["eager"]["fused"]["latency_ms"] > 0
    assert data["latency"]["threads"] == torch.get_num_threads()
    assert data["latency"]["batch_size"] == EXAMPLE_BATCH
    assert data["latency"]["rounds"] >= 3
    assert report.passed
    assert report.announced() == {fmt: tmp_path / a.path.name for fmt, a in artifacts.items()}

    table = report.table()
    lines = table.splitlines()
    assert lines[0] == "deploy artifacts, verified on 25 samples against the original (MulticlassAccuracy 0.8000)"
    assert lines[1].split() == [
        "format", "runtime", "MulticlassAccuracy", "max", "abs", "diff", "passed", "latency", "ms", "ratio"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[2:]] == ["unfused", "fused", "pt2", "onnx", "weights"]
    assert all(" yes " in line for line in lines[4:])
    assert deploy_table(data) == table  # the same table from the JSON file


def test_verify_artifacts_without_timing_and_from_a_one_shot_iterable(
    written: tuple[Case, dict[str, Artifact]],
) -> None:
    case, artifacts = written
    batches = iter(case.batches)  # a generator-like iterable is read once
    report = verify_artifacts(
        {"weights": artifacts["weights"]}, case.original, case.fused, batches, case.example, latency_budget_s=None
    )
    result = report.artifacts["weights"]
    assert result.passed
    assert result.verification is not None
    assert result.verification.num_samples == 25
    assert (result.latency_ms, result.latency_ratio) == (None, None)
    assert report.eager["unfused"] == {"latency_ms": None, "latency_ratio": None}
    assert "latency" not in report.table().splitlines()[2]  # no eager rows without timing
    assert report.table().splitlines()[2].startswith("weights")


def test_verify_artifacts_max_batches_and_paths(written: tuple[Case, dict[str, Artifact]]) -> None:
    case, artifacts = written
    report = verify_artifacts(
        {"weights": str(artifacts["weights"].path)},
        case.original,
        case.fused,
        case.batches,
        case.example,
        max_batches=2,
        latency_budget_s=0,
    )
    assert report.artifacts["weights"].verification is not None
    assert report.artifacts["weights"].verification.num_samples == 20
    assert report.artifacts["weights"].runtime == "torch eager, load_state_dict(strict=True)"


def test_verify_artifacts_on_one_process_of_a_distributed_run(
    written: tuple[Case, dict[str, Artifact]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Artifacts are checked on global rank zero alone: its metrics must not wait for the other processes."""
    case, artifacts = written
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    report = verify_artifacts(
        {"weights": artifacts["weights"]}, case.original, case.fused, case.batches, case.example, latency_budget_s=0
    )
    assert report.passed


def test_export_and_verify_writes_checks_and_times(tmp_path: Path) -> None:
    case = make_case()
    report = export_and_verify(
        case.original,
        case.fused,
        case.example,
        tmp_path,
        case.batches,
        ["pt2", "weights"],
        name="digits",
        dynamic_batch=True,
        metric=accuracy(),
        latency_budget_s=0.05,
    )
    assert report.announced() == {"pt2": tmp_path / "digits.pt2", "weights": tmp_path / "digits.safetensors"}
    assert report.artifacts["pt2"].notes == []  # dynamic batch: no chunks
    assert all(a.latency_ms is not None for a in report.artifacts.values())


# ----------------------------------------------------------------------------------------- failures


def roll_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime returns every output with its classes rolled by one: a wrong runtime, as patched."""
    import onnxruntime as ort

    real_run = ort.InferenceSession.run

    def rolled(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
        import numpy as np

        return [np.roll(o, 1, axis=-1) for o in real_run(self, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", rolled)


def test_artifact_that_computes_something_else_is_renamed_and_not_announced(
    written: tuple[Case, dict[str, Artifact]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case, artifacts = written
    roll_outputs(monkeypatch)
    with pytest.warns(ArtifactMismatchWarning) as record:
        report = verify_artifacts(
            copied(artifacts, tmp_path),
            case.original,
            case.fused,
            case.batches,
            case.example,
            metric=accuracy(),
            latency_budget_s=0.05,
        )
    assert len(record) == 1
    message = str(record[0].message)
    onnx = tmp_path / "model.onnx"
    pattern = (
        rf"the 'onnx' artifact {onnx} \(run by onnxruntime \S+ CPU, ORT_ENABLE_ALL\) failed verification over 25 "
        r"samples: MulticlassAccuracy original 0.8, artifact (\S+) \(\|diff\| (\S+), tolerance 0.001, missed by "
        r"(\S+)\); max abs "
        rf"diff (\S+), max rel diff \S+\. It is kept as {tmp_path / 'model.FAILED.onnx'} and not announced"
    )
    found = re.fullmatch(pattern, message)
    assert found, message
    result = report.artifacts["onnx"]
    assert result.verification is not None
    assert float(found.group(1)) == pytest.approx(result.verification.metric_fused["MulticlassAccuracy"], rel=1e-5)
    assert float(found.group(2)) > 0.5
    assert float(found.group(3)) == pytest.approx(float(found.group(2)) - 0.001, abs=1e-3)
    assert float(found.group(4)) == pytest.approx(result.verification.max_abs_diff, rel=1e-2)
    assert not onnx.exists()
    assert (tmp_path / "model.FAILED.onnx").is_file()
    assert result.path == tmp_path / "model.FAILED.onnx"
    assert not result.passed
    assert set(report.announced()) == {"pt2", "weights"}
    assert not report.passed
    entry = report.to_dict()["artifacts"]["onnx"]
    assert entry["path"].endswith("model.FAILED.onnx")
    assert entry["verification"]["passed"] is False
    assert entry["latency_ms"] > 0  # timed all the same
    assert " NO " in next(line for line in report.table().splitlines() if line.startswith("onnx"))


def test_artifact_mismatch_with_strict_raises_naming_it(
    written: tuple[Case, dict[str, Artifact]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case, artifacts = written
    roll_outputs(monkeypatch)
    with pytest.raises(
        RuntimeError,
        match=r"verify_artifacts\(strict=True\): 1 artifact\(s\) failed and were renamed, not announced: the 'onnx' "
        r"artifact .*model.onnx .*failed verification over 25 samples: MulticlassAccuracy original 0.8, artifact "
        r"\S+ \(\|diff\| \S+, tolerance 0.001, "
        r"missed by \S+\); max abs diff \S+, max rel diff \S+\. It is kept as .*model.FAILED.onnx",
    ):
        verify_artifacts(
            {"onnx": copied(artifacts, tmp_path)["onnx"]},
            case.original,
            case.fused,
            case.batches,
            case.example,
            metric=accuracy(),
            latency_budget_s=0,
            strict=True,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.FAILED.onnx", "model.pt2", "model.safetensors"]


def test_output_tolerance_fails_an_artifact_whose_metric_holds(
    written: tuple[Case, dict[str, Artifact]], tmp_path: Path
) -> None:
    case, artifacts = written
    weights = artifacts["weights"].load(case.fused)
    nudged = Artifact("nudged", tmp_path / "nudged.bin", runtime="eager + 1e-3", runner=lambda x: weights(x) + 1e-3)
    nudged.path.write_bytes(b"")
    with pytest.warns(
        ArtifactMismatchWarning,
        match=r"'nudged' artifact .*nudged.bin \(run by eager \+ 1e-3\) failed verification over 25 samples: "
        r"MulticlassAccuracy original 0.8, artifact 0.8 \(\|diff\| 0, tolerance 0.001\); max abs diff 0.001, "
        r"max rel diff \S+ \(tolerance 1e-05, relative\)\. It is kept as .*nudged.FAILED.bin",
    ):
        report = verify_artifacts(
            {"nudged": nudged},
            case.original,
            case.fused,
            case.batches,
            case.example,
            metric=accuracy(),
            output_tolerance=1e-5,
            latency_budget_s=0,
        )
    assert report.announced() == {}


def test_artifact_that_does_not_load_or_run_is_not_announced(
    written: tuple[Case, dict[str, Artifact]], tmp_path: Path
) -> None:
    case, artifacts = written
    mine = copied(artifacts, tmp_path)
    # the weights check is checkpoint-like: a strict load into the network's structure
    from safetensors.torch import load_file, save_file

    state = load_file(str(mine["weights"].path))
    del state["0.weight"]
    save_file(state, str(mine["weights"].path))

    def fails(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("the runtime rejected the input")

    broken = Artifact("ckpt", tmp_path / "deploy.ckpt", runtime="load_from_checkpoint", runner=fails)
    broken.path.write_bytes(b"")
    with pytest.warns(ArtifactMismatchWarning) as record:
        report = verify_artifacts(
            {"weights": mine["weights"], "ckpt": broken},
            case.original,
            case.fused,
            case.batches,
            case.example,
            latency_budget_s=0.02,
        )
    messages = [str(r.message) for r in record]
    assert re.fullmatch(
        r"the 'weights' artifact .*model.safetensors \(run by torch eager, load_state_dict\(strict=True\)\) could "
        r"not be checked: loading it failed: RuntimeError: Error\(s\) in loading state_dict for Sequential:.*"
        r"It is kept as .*model.FAILED.safetensors and not announced",
        messages[0],
    ), messages[0]
    assert messages[1] == (
        f"the 'ckpt' artifact {broken.path} (run by load_from_checkpoint) could not be checked: running it on "
        "verification batch 0 failed: ValueError: the runtime rejected the input. It is kept as "
        f"{tmp_path / 'deploy.FAILED.ckpt'} and not announced"
    )
    assert report.announced() == {}
    entry = report.to_dict()["artifacts"]["ckpt"]
    assert entry["verification"] == {
        "metric_original": {},
        "metric_artifact": {},
        "max_abs_diff": None,
        "max_rel_diff": None,
        "compared": None,
        "num_samples": 0,
        "passed": False,
        "tolerance": None,
        "output_tolerance": None,
        "top1_agreement": None,
        "metric_drop": {},
    }
    assert entry["latency_ms"] is None
    assert entry["error"].startswith("running it on verification batch 0 failed")


def test_artifact_that_passes_again_clears_an_earlier_failed_copy(
    written: tuple[Case, dict[str, Artifact]], tmp_path: Path
) -> None:
    case, artifacts = written
    mine = copied({"weights": artifacts["weights"]}, tmp_path)
    stale = failed_path(mine["weights"].path)
    stale.write_bytes(b"from an earlier run")
    report = verify_artifacts(mine, case.original, case.fused, case.batches, case.example, latency_budget_s=0)
    assert report.passed
    assert not stale.exists()


def test_failed_path_marks_the_last_suffix() -> None:
    assert failed_path("out/model.onnx") == Path("out/model.FAILED.onnx")
    assert failed_path(Path("a/model.aoti.pt2")) == Path("a/model.aoti.FAILED.pt2")
    assert failed_path("deploy.ckpt").name == "deploy.FAILED.ckpt"


# ----------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"original": "net"}, TypeError, r"verify_artifacts\(original=...\) expects a torch.nn.Module, got str"),
        ({"fused": None}, TypeError, r"verify_artifacts\(fused=...\) expects a torch.nn.Module, got NoneType"),
        ({"batches": torch.zeros(2)}, TypeError, r"verify_artifacts\(batches=...\) expects an iterable of batches"),
        ({"batches": []}, ValueError, r"verify_artifacts\(batches=...\) got no batches"),
        ({"example_inputs": torch.zeros(2)}, TypeError, r"expects a tuple of positional inputs, got Tensor"),
        ({"metric": "accuracy"}, TypeError, r"verify_artifacts\(metric='accuracy'\) expects a torchmetrics Metric"),
        ({"max_batches": 0}, ValueError, r"verify_artifacts\(max_batches=0\) expects a positive integer or None"),
        ({"strict": "yes"}, TypeError, r"verify_artifacts\(strict='yes'\) expects True or False"),
        ({"tolerance": math.nan}, ValueError, r"verify_artifacts\(tolerance=nan\) expects a number"),
        ({"latency_budget_s": -1}, ValueError, r"verify_artifacts\(latency_budget_s=-1\) expects seconds >= 0"),
        ({"artifacts": {}}, TypeError, r"verify_artifacts\(artifacts=\{\}\) expects a non-empty dict of format"),
        ({"artifacts": {"pt2": 3}}, TypeError, r"artifacts=\{'pt2': 3\}\) expects an Artifact or a path, got int"),
        (
            {"artifacts": {"tflite": "m.tflite"}},
            ValueError,
            r"artifacts=\{'tflite': ...\}\): a path needs a registered format \(\['pt2', .*Artifact\('tflite', path, "
            r"runner=...\)",
        ),
    ],
)
def test_verify_artifacts_invalid_arguments_raise(
    written: tuple[Case, dict[str, Artifact]], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    case, artifacts = written
    call: dict[str, Any] = {
        "artifacts": {"weights": artifacts["weights"]},
        "original": case.original,
        "fused": case.fused,
        "batches": case.batches,
        "example_inputs": case.example,
        "latency_budget_s": 0,
    }
    with pytest.raises(error, match=match):
        verify_artifacts(**(call | kwargs))
    assert artifacts["weights"].path.exists()  # nothing renamed


def test_artifact_load_of_an_unregistered_format_raises(tmp_path: Path) -> None:
    match = r"Artifact\(format='tflite', loader=None\) names no registered format \(\['pt2', "
    with pytest.raises(ValueError, match=match):
        Artifact("tflite", tmp_path / "m.tflite").load(nn.Linear(2, 2))


def test_deploy_table_needs_artifacts() -> None:
    with pytest.raises(
        ValueError, match=r"deploy_table\(report\) expects a dict with an 'artifacts' entry .*got keys "
    ):
        deploy_table({"outcome": "fused"})

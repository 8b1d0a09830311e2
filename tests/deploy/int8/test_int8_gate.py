"""The int8 gate without a Trainer: ``export_and_verify(..., int8={...}, calibration=...)``.

The networks here are sensitive on purpose. Their input has one channel with values a thousand times larger
than the others, which the first convolution's weights ignore. ONNX Runtime quantizes activations per tensor, so
quantizing the first convolution's input spends the whole uint8 range on that channel and rounds the others to
the zero point: accuracy collapses. Keeping that one layer in float leaves its input unquantized and restores it.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from fx_lightning import FuseOnExport, fuse
from fx_lightning.deploy.flow import ArtifactMismatchWarning, DeployReport, deploy_table, export_and_verify
from fx_lightning.deploy.formats import MissingExtraError

pytest.importorskip("onnxruntime.quantization")

NUM_CLASSES = 4
EXAMPLE_BATCH = 8
BUDGET = 0.05  # max_metric_drop: three samples in 64


def accuracy() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")


def sensitive_net(seed: int = 0, huge_hidden_channel: bool = False) -> nn.Sequential:
    """Two Conv-BN-ReLU blocks and a linear head whose first convolution ignores input channel 0.

    With ``huge_hidden_channel`` the first convolution also copies input channel 0 to its output channel 0, which
    the second convolution ignores: both convolutions then have a huge channel in their input, and both must stay
    in float. The head's bias centres the logits so that the predicted classes are balanced.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, NUM_CLASSES),
    ).eval()
    with torch.no_grad():
        net[0].weight[:, 0] = 0
        if huge_hidden_channel:
            net[0].weight[0] = 0
            net[0].weight[0, 0, 1, 1] = 1
            net[3].weight[:, 0] = 0
        for bn in (net[1], net[4]):  # folding must matter
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        net[7].bias -= net(inputs(256, torch.Generator().manual_seed(seed))).mean(dim=0)
    return net


def inputs(size: int, generator: torch.Generator) -> Tensor:
    x = torch.randn(size, 4, 8, 8, generator=generator)
    x[:, 0] *= 1000
    return x


def labelled(net: nn.Module, count: int, seed: int, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches labelled with the (eval-mode) network's own prediction: the original scores 1.0."""
    assert not net.training
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = inputs(size, generator)
        with torch.no_grad():
            batches.append((x, net(x).argmax(dim=1)))
    return batches


def run(
    net: nn.Module,
    directory: Path,
    int8: dict[str, Any],
    *,
    calibration: Any = None,
    batches: list[tuple[Tensor, Tensor]] | None = None,
    fused: nn.Module | None = None,
    **kwargs: Any,
) -> DeployReport:
    """export_and_verify of the float and int8 ONNX artifacts: 4 verification batches of 16, 4 of calibration."""
    batches = batches if batches is not None else labelled(net, 4, seed=1)
    example = (batches[0][0][:EXAMPLE_BATCH],)
    return export_and_verify(
        net,
        fused if fused is not None else fuse(net, example),
        example,
        directory,
        batches,
        formats=["onnx"],
        int8={"calibration_batches": 4, "max_metric_drop": BUDGET} | int8,
        calibration=calibration if calibration is not None else labelled(net, 4, seed=2),
        metric=accuracy(),
        **({"dynamic_batch": True, "latency_budget_s": 0} | kwargs),
    )


@contextmanager
def mismatch_warning(expected: bool) -> Iterator[None]:
    """Expect an ArtifactMismatchWarning, or fail on one."""
    if expected:
        with pytest.warns(ArtifactMismatchWarning):
            yield
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ArtifactMismatchWarning)
            yield


def first_conv(path: Path) -> str:
    """The first convolution as the report names it: its module path in the network (``0``) and its ONNX node,
    the one that reads the network input."""
    import onnx

    graph = onnx.load(str(path)).graph
    node = next(n for n in graph.node if n.op_type == "Conv")
    assert node.input[0] == graph.input[0].name
    return f"0 ({node.name})"


def split_label(label: str) -> tuple[str, str]:
    """``"3 (node_conv2d_1)"`` -> ``("3", "node_conv2d_1")``."""
    match = re.fullmatch(r"(\S+) \((\S+)\)", label)
    assert match, label
    return match[1], match[2]


@pytest.fixture(scope="module")
def fallback(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeployReport, Path]:
    """The sensitive network through the gate with the default fallback (timed briefly, for the table)."""
    directory = tmp_path_factory.mktemp("fallback")
    return run(sensitive_net(), directory, {}, latency_budget_s=0.05), directory


# ----------------------------------------------------------------------------------------- the fallback


def test_export_and_verify_int8_keeps_the_sensitive_layer_in_float_and_passes(
    fallback: tuple[DeployReport, Path],
) -> None:
    import onnx

    report, directory = fallback
    conv = first_conv(directory / "model.onnx")
    assert report.artifacts["onnx-int8"].passed
    assert report.announced() == {"onnx": directory / "model.onnx", "onnx-int8": directory / "model.int8.onnx"}
    assert not (directory / "model.int8.FAILED.onnx").exists()

    entry = json.loads(json.dumps(report.to_dict(), allow_nan=False))["artifacts"]["onnx-int8"]
    assert entry["base"] == "onnx"
    assert entry["verification"]["tolerance"] == BUDGET
    assert entry["verification"]["metric_original"] == {"MulticlassAccuracy": 1.0}
    assert abs(entry["verification"]["metric_drop"]["MulticlassAccuracy"]) <= BUDGET
    int8 = entry["int8"]
    assert int8["layers"] == 3  # two convolutions and the head
    assert int8["float_layers"] == [conv]
    attempts = int8["attempts"]
    assert [a["float_layers"] for a in attempts] == [0, 1]
    assert [a["passed"] for a in attempts] == [False, True]
    assert attempts[0]["worst_drop"] > 0.3  # every layer quantized: the small channels are rounded away
    assert attempts[-1]["worst_drop"] <= BUDGET
    assert attempts[-1]["metric"]["MulticlassAccuracy"] == pytest.approx(
        entry["verification"]["metric_artifact"]["MulticlassAccuracy"]
    )  # the final check agrees with the last attempt
    sensitivity = int8["sensitivity"]
    assert [s["layer"] for s in sensitivity][0] == conv
    nodes = [n.name for n in onnx.load(str(directory / "model.onnx")).graph.node if n.op_type in ("Conv", "Gemm")]
    labels = [split_label(s["layer"]) for s in sensitivity]
    assert sorted(node for _, node in labels) == sorted(nodes)
    assert sorted(module for module, _ in labels) == ["0", "3", "7"]  # the convolutions and the head
    assert sensitivity[0]["error"] > 10 * sensitivity[1]["error"]
    assert int8["summary"] == (
        f"1 layer(s) kept in float ({conv}); metric drop {attempts[-1]['worst_drop']:.4g} within {BUDGET:g}"
    )

    # the file is int8 everywhere but the first convolution, whose input (the network input) stays float
    graph = onnx.load(entry["path"]).graph
    quantized = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantized
    assert all(graph.input[0].name not in n.input for n in quantized)


def test_export_and_verify_int8_over_budget_is_renamed_and_warned(tmp_path: Path) -> None:
    with pytest.warns(ArtifactMismatchWarning) as record:
        report = run(sensitive_net(), tmp_path, {"max_float_layers": 0})

    failed = tmp_path / "model.int8.FAILED.onnx"
    assert report.announced() == {"onnx": tmp_path / "model.onnx"}
    assert report.artifacts["onnx"].passed
    assert failed.exists()
    assert not (tmp_path / "model.int8.onnx").exists()

    entry = json.loads(json.dumps(report.to_dict(), allow_nan=False))["artifacts"]["onnx-int8"]
    assert entry["path"] == str(failed)
    assert entry["verification"]["passed"] is False
    int8 = entry["int8"]
    assert int8["float_layers"] == []
    assert "sensitivity" not in int8  # no fallback allowed, so no ranking
    assert len(int8["attempts"]) == 1
    worst = int8["attempts"][0]["worst_drop"]
    assert worst > int8["max_metric_drop"] == BUDGET
    assert worst == pytest.approx(abs(entry["verification"]["metric_drop"]["MulticlassAccuracy"]))
    assert int8["summary"] == (
        f"over budget: every layer quantized, metric drop {worst:.4g}, budget {BUDGET:g}, missed by "
        f"{worst - BUDGET:.4g}"
    )

    messages = [str(w.message) for w in record if issubclass(w.category, ArtifactMismatchWarning)]
    assert len(messages) == 1
    message = messages[0]
    assert message.startswith("the 'onnx-int8' artifact ")
    assert "missed by" in message
    assert f"int8: {int8['summary']}" in message
    assert message.endswith(f"It is kept as {failed} and not announced")


def test_export_and_verify_int8_over_budget_raises_when_strict(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"strict=True\): 1 artifact\(s\) failed .*'onnx-int8'.*missed by"):
        run(sensitive_net(), tmp_path, {"max_float_layers": 0}, strict=True)
    assert (tmp_path / "model.int8.FAILED.onnx").exists()
    assert (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(("max_float_layers", "passed"), [(1, False), (2, True)])
def test_export_and_verify_int8_fallback_stops_at_max_float_layers(
    tmp_path: Path, max_float_layers: int, passed: bool
) -> None:
    """Both convolutions see a huge channel: one layer in float is not enough, two are."""
    net = sensitive_net(huge_hidden_channel=True)
    with mismatch_warning(expected=not passed):
        report = run(net, tmp_path, {"max_float_layers": max_float_layers})

    int8 = report.to_dict()["artifacts"]["onnx-int8"]["int8"]
    convs = {s["layer"] for s in int8["sensitivity"][:2]}
    assert first_conv(tmp_path / "model.onnx") in convs
    assert len(convs) == 2
    assert all(s["error"] < 0.01 for s in int8["sensitivity"][2:])  # the head is harmless
    assert [a["passed"] for a in int8["attempts"]] == [False] * max_float_layers + [passed]
    assert int8["float_layers"] == [s["layer"] for s in int8["sensitivity"][:max_float_layers]]
    assert report.artifacts["onnx-int8"].passed is passed
    assert ("onnx-int8" in report.announced()) is passed
    if not passed:
        assert int8["summary"].startswith("over budget after 2 attempt(s): 1 layer(s) kept in float")


# ----------------------------------------------------------------------------------------- nothing else changes


def test_export_and_verify_int8_leaves_the_model_and_its_batch_norm_untouched(tmp_path: Path) -> None:
    """The user's network is the original passed in, in train mode with one frozen BatchNorm: calibration and
    verification must not run it in train mode, nor leave it in eval mode."""
    model = sensitive_net()
    batches = labelled(model, 4, seed=1)
    calibration = DataLoader(TensorDataset(*map(torch.cat, zip(*labelled(model, 4, seed=2)))), batch_size=16)
    model.train()
    model[4].eval()  # a frozen BatchNorm keeps its own flag
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    fused = fuse(model, (batches[0][0][:EXAMPLE_BATCH],))  # an eval copy: fuse leaves the model's flags alone
    assert [m.training for m in model.modules()] == flags

    report = run(model, tmp_path, {}, calibration=calibration, batches=batches, fused=fused)

    assert report.artifacts["onnx-int8"].passed
    assert report.to_dict()["artifacts"]["onnx-int8"]["int8"]["calibration_samples"] == 64
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert int(model[1].num_batches_tracked) == int(model[4].num_batches_tracked) == 0


def test_export_and_verify_int8_leaves_the_random_state_untouched(tmp_path: Path) -> None:
    """Iterating a DataLoader draws its base seed (and a shuffled one its order) from torch's generator: reading
    the calibration batches must not change the random numbers drawn after the call, as verification does not."""
    model = sensitive_net()
    batches = labelled(model, 4, seed=1)
    dataset = TensorDataset(*map(torch.cat, zip(*labelled(model, 4, seed=2))))
    calibration = DataLoader(dataset, batch_size=16, shuffle=True)
    fused = fuse(model, (batches[0][0][:EXAMPLE_BATCH],))
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()

    report = run(model, tmp_path, {}, calibration=calibration, batches=batches, fused=fused)

    assert report.to_dict()["artifacts"]["onnx-int8"]["int8"]["calibration_samples"] == 64
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0]
    assert np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state), "reading the calibration DataLoader drew from torch's RNG"


# ----------------------------------------------------------------------------------------- fixed batch size


@pytest.mark.parametrize(("calibration_size", "samples"), [(24, 48), (20, 32)])
def test_export_and_verify_int8_fixed_batch_calibrates_in_chunks(
    tmp_path: Path, calibration_size: int, samples: int
) -> None:
    """A file written for batches of 8 calibrates on batches of another size in chunks of 8 (a short last chunk is
    dropped), ranks its layers on them, and is verified on batches of 16 in chunks."""
    import onnx

    net = sensitive_net()
    calibration = labelled(net, 2, seed=2, size=calibration_size)
    report = run(net, tmp_path, {"calibration_batches": 2}, calibration=calibration, dynamic_batch=False)

    entry = report.to_dict()["artifacts"]["onnx-int8"]
    assert report.artifacts["onnx-int8"].passed, report.failures()
    int8 = entry["int8"]
    assert int8["calibration_samples"] == samples
    assert int8["float_layers"] == [first_conv(tmp_path / "model.onnx")]
    assert entry["verification"]["num_samples"] == 64
    assert entry["notes"][0].startswith("written with a fixed batch size of 8")
    dim = onnx.load(entry["path"]).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == EXAMPLE_BATCH
    # the report counts the training batches read, as the option does, not the chunks they were cut into
    assert int8["calibration_batches"] == 2, "calibration_batches reports the chunks, not the batches read"


# ----------------------------------------------------------------------------------------- the deploy table


def test_deploy_table_has_the_int8_columns(fallback: tuple[DeployReport, Path]) -> None:
    report, _ = fallback
    table = report.table()
    header, *rows = table.splitlines()[1:]
    for column in ("vs float", "float layers", "calib s"):
        assert column in header
    starts = [header.index(c) for c in ("vs float", "float layers", "calib s")]

    def cells(line: str) -> list[str]:
        return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]

    by_format = {line.split()[0]: line for line in rows}
    assert list(by_format) == ["unfused", "fused", "onnx", "onnx-int8"]
    for name in ("unfused", "fused", "onnx"):
        assert cells(by_format[name]) == ["", "", ""], name
    vs_float, float_layers, calib_s = cells(by_format["onnx-int8"])
    entry = report.to_dict()["artifacts"]["onnx-int8"]
    assert float(vs_float) == pytest.approx(entry["latency_ratio_base"], abs=5e-4)
    assert float_layers == "1"
    assert float(calib_s) == pytest.approx(entry["int8"]["calibration_s"], abs=0.05)
    assert " yes " in by_format["onnx-int8"]
    assert deploy_table(json.loads(json.dumps(report.to_dict()))) == table  # the same table from the JSON file


# ----------------------------------------------------------------------------------------- validation

INVALID = [
    pytest.param({"formats": ["onnx"], "max_drop": 0.1}, ValueError, r"unknown key\(s\) \['max_drop'\]", id="key"),
    pytest.param({"formats": "onnx"}, TypeError, r"'formats': 'onnx'\}\) expects a list of format names", id="str"),
    pytest.param({"formats": ["pt2"]}, ValueError, r"formats=\['pt2'\] names no int8 format or unknown ones", id="pt2"),
    pytest.param({"formats": []}, ValueError, r"formats=\[\] names no int8 format", id="no-format"),
    pytest.param({"calibration_batches": 0}, ValueError, r"calibration_batches=0 expects an integer >= 1", id="batch"),
    pytest.param({"max_metric_drop": -1}, ValueError, r"max_metric_drop=-1 expects a finite number >= 0", id="drop"),
    pytest.param({"max_metric_drop": math.nan}, ValueError, r"max_metric_drop=nan expects a finite number", id="nan"),
    pytest.param({"max_float_layers": -1}, ValueError, r"max_float_layers=-1 expects an integer >= 0", id="layers"),
    pytest.param(
        {"calibration_method": "kl"},
        ValueError,
        r"calibration_method='kl' is not one of \['minmax', 'entropy', 'percentile', 'distribution'\]",
        id="method",
    ),
    pytest.param(["onnx"], TypeError, r"expects a dict of int8 options .*got list", id="list"),
]


@pytest.mark.parametrize(("int8", "error", "match"), INVALID)
def test_export_and_verify_rejects_int8_options_before_writing(
    tmp_path: Path, int8: Any, error: type[Exception], match: str
) -> None:
    net = sensitive_net()
    x = torch.randn(EXAMPLE_BATCH, 4, 8, 8)
    with pytest.raises(error, match=r"^export_and_verify\(int8=.*" + match):
        export_and_verify(net, net, (x,), tmp_path / "out", [(x, x)], ["onnx"], int8=int8, calibration=[(x,)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("int8", "error", "match"), INVALID)
def test_fuse_on_export_rejects_int8_options_at_construction(int8: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=r"^FuseOnExport\(int8=.*" + match):
        FuseOnExport(int8=int8)


@pytest.mark.parametrize(
    ("calibration", "kind"), [(None, "NoneType"), (torch.zeros(2, 4, 8, 8), "Tensor"), ({"x": 1}, "dict")]
)
def test_export_and_verify_int8_needs_calibration_batches(tmp_path: Path, calibration: Any, kind: str) -> None:
    net = sensitive_net()
    x = torch.randn(EXAMPLE_BATCH, 4, 8, 8)
    with pytest.raises(TypeError, match=rf"calibration={kind}\) needs the batches to calibrate on: pass calibration="):
        export_and_verify(net, net, (x,), tmp_path / "out", [(x, x)], ["onnx"], int8={}, calibration=calibration)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxruntime.quantization"])
def test_fuse_on_export_int8_without_the_onnx_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    import onnxruntime

    monkeypatch.setitem(sys.modules, missing, None)
    if missing == "onnxruntime.quantization":  # else `from onnxruntime import quantization` finds the attribute
        monkeypatch.delattr(onnxruntime, "quantization")
    pip = re.escape('pip install "fx-lightning[onnx]"')
    with pytest.raises(MissingExtraError, match=r"^FuseOnExport\(int8=\.\.\.\) with formats=\['onnx'\]: .*" + pip):
        FuseOnExport(int8={"formats": ["onnx"]})
    x = torch.randn(EXAMPLE_BATCH, 4, 8, 8)
    with pytest.raises(MissingExtraError, match=pip):
        export_and_verify(nn.Identity(), nn.Identity(), (x,), tmp_path, [(x, x)], ["onnx"], int8={}, calibration=[x])


def test_int8_options_are_not_shared_between_calls() -> None:
    """A dict of options is read, not kept: changing it afterwards changes nothing."""
    options = {"formats": ["onnx"], "max_metric_drop": 0.02}
    callback = FuseOnExport(int8=options)
    options["formats"].append("pt2")
    options["max_metric_drop"] = 0.5
    assert callback.int8 is not None
    assert callback.int8.formats == ("onnx",)
    assert callback.int8.max_metric_drop == 0.02

"""options: FuseOnExport's arguments checked in one dataclass, the defaults written once."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from fx_lightning import FuseOnExport
from fx_lightning.deploy.int8.options import Int8Options
from fx_lightning.lightning.options import (
    CHECKPOINT_FORMAT,
    DEFAULT_EXPORT_FORMATS,
    DEFAULT_EXPORT_STAGES,
    DEFAULT_STAGES,
    OPTION_NAMES,
    FuseOptions,
)


def test_fuse_options_none_lists_take_their_defaults() -> None:
    options = FuseOptions()
    assert options.stages == list(DEFAULT_STAGES) == ["test", "predict"]
    assert options.export_formats == list(DEFAULT_EXPORT_FORMATS) == ["pt2", "weights", CHECKPOINT_FORMAT]
    assert options.export_stages == list(DEFAULT_EXPORT_STAGES) == ["fit", "test"]
    assert options.export_options == {}
    assert options.attributes is None
    assert options.int8 is None


def test_fuse_options_copy_what_they_are_given() -> None:
    stages, formats, export_options = ["test"], ["onnx"], {"onnx": {"optimization_level": "basic"}}
    options = FuseOptions(stages=stages, export_formats=formats, export_options=export_options)
    stages.append("predict")
    export_options["onnx"]["optimization_level"] = "all"
    assert options.stages == ["test"]
    assert options.export_options == {"onnx": {"optimization_level": "basic"}}


def test_fuse_options_are_the_constructor_arguments_with_the_same_defaults() -> None:
    parameters = list(inspect.signature(FuseOnExport.__init__).parameters.values())[1:]
    assert tuple(p.name for p in parameters) == OPTION_NAMES
    fields = FuseOptions.__dataclass_fields__
    for parameter in parameters:
        assert fields[parameter.name].default == parameter.default, parameter.name


def test_fuse_options_written_formats_add_the_int8_float_formats_and_drop_the_checkpoint() -> None:
    options = FuseOptions(export_formats=["weights", "ckpt"], int8={"formats": ["onnx"]})
    assert isinstance(options.int8, Int8Options)
    assert options.written_formats() == ["weights", "onnx"]
    assert FuseOptions(export_formats=["ckpt"]).written_formats() == []


def test_fuse_options_stage_decisions() -> None:
    options = FuseOptions(stages=["validate"], export_stages=["test"], fuse_after_fit=False)
    assert [s for s in ("fit", "test", "predict", "validate") if options.fuses_before(s)] == ["validate"]
    assert [s for s in ("fit", "test", "predict", "validate") if options.exports_after(s)] == ["test"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attributes": "net"}, ValueError, r"FuseOnExport\(attributes='net'\) expects a list of attribute names"),
        ({"attributes": ["net", ""]}, ValueError, r"FuseOnExport\(attributes=\['net', ''\]\) expects a list"),
        ({"stages": ["fit"]}, ValueError, r"FuseOnExport\(stages=\['fit'\]\) expects a list drawn from \['test'"),
        ({"stages": "test"}, ValueError, r"FuseOnExport\(stages='test'\) expects a list drawn from"),
        ({"on_mismatch": "ignore"}, ValueError, r"FuseOnExport\(on_mismatch='ignore'\) expects one of \['revert'"),
        ({"max_verify_batches": 0}, ValueError, r"FuseOnExport\(max_verify_batches=0\)"),
        ({"export_formats": ["tflite"]}, ValueError, r"FuseOnExport\(export_formats=\['tflite'\]\) expects a list"),
        ({"export_formats": "pt2"}, ValueError, r"FuseOnExport\(export_formats='pt2'\) expects a list drawn from"),
        ({"export_stages": ["train"]}, ValueError, r"FuseOnExport\(export_stages=\['train'\]\) expects a list"),
        ({"export_options": ["onnx"]}, TypeError, r"FuseOnExport\(export_options=\['onnx'\]\) expects a dict of"),
        (
            {"export_options": {"onnx": {}}, "export_formats": ["pt2"]},
            ValueError,
            r"FuseOnExport\(export_options=\{'onnx': \{\}\}\) has options for \['onnx'\], which "
            r"export_formats=\['pt2'\] does not write",
        ),
        ({"deploy_latency_budget": -1}, ValueError, r"FuseOnExport\(deploy_latency_budget=-1\) expects seconds >= 0"),
        ({"deploy_latency_budget": float("inf")}, ValueError, r"FuseOnExport\(deploy_latency_budget=inf\)"),
        ({"deploy_latency_budget": True}, ValueError, r"FuseOnExport\(deploy_latency_budget=True\)"),
        ({"metric": torch.nn.MSELoss()}, TypeError, r"FuseOnExport"),
        ({"tolerance": "small"}, TypeError, r"FuseOnExport"),
        ({"int8": "onnx"}, TypeError, r"FuseOnExport\(int8='onnx'\) expects a dict of int8 options"),
    ],
)
def test_fuse_options_reject_bad_values_naming_the_call(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FuseOptions(**kwargs)
    with pytest.raises(error, match=match):  # the callback's constructor raises the same
        FuseOnExport(**kwargs)


def test_fuse_on_export_attributes_read_and_set_the_options() -> None:
    metric = MulticlassAccuracy(num_classes=3)
    callback = FuseOnExport(tolerance=0.01, metric=metric, export_formats=["weights"], stages=["test"])
    assert callback.tolerance == 0.01
    assert callback.metric is metric
    assert callback.export_formats == ["weights"]
    assert callback.stages == ["test"]
    assert callback.export_stages == ["fit", "test"]
    callback.tolerance = 0.5
    assert callback.options.tolerance == 0.5
    for name in OPTION_NAMES:
        assert getattr(callback, name) is getattr(callback.options, name), name

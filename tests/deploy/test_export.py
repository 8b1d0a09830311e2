"""export_artifacts (pt2, onnx, weights, each reloaded and checked) and checkpoint_state_dict."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import fx_lightning
from fx_lightning.deploy.export import (
    MissingExtraError,
    _check_close,
    checkpoint_state_dict,
    export_artifacts,
    write_artifacts,
)
from fx_lightning.fusion.checkpoint_form import checkpoint_plan
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err


class TinyNet(nn.Module):
    """Conv-BN (no conv bias), Conv-BN (with conv bias), and a Linear-BatchNorm1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(6, eps=1e-3)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class ShapeBranch(nn.Module):
    """Branches on the input's static shape: torch.fx cannot trace that, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, 4), nn.BatchNorm1d(4))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > 4:
            x = self.body(x)
        return self.head(x)


class Noisy(nn.Module):
    """Different outputs on every call, so no reloaded artifact can match."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + torch.rand(x.shape[0], 2)


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batch_norm(model, seed).eval()


# ----------------------------------------------------------------------------------------- export_artifacts


def test_export_artifacts_all_formats_reload_to_same_outputs(tmp_path: Path) -> None:
    model = prepared(TinyNet())
    fused = fx_lightning.fuse(model)
    x = torch.randn(2, 1, 6, 6)
    paths = export_artifacts(fused, (x,), tmp_path / "out" / "nested", formats=("pt2", "onnx", "weights"))
    assert set(paths) == {"pt2", "onnx", "weights"}
    assert paths["pt2"] == tmp_path / "out" / "nested" / "model.pt2"
    assert paths["onnx"].name == "model.onnx"
    assert paths["weights"].name == "model.safetensors"
    assert all(p.is_file() for p in paths.values())
    expected = fused(x)
    # independent reloads of each file
    program = torch.export.load(paths["pt2"]).module()
    assert rel_err(program(x), expected) < 1e-5
    import onnxruntime

    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel_err(torch.from_numpy(onnx_out), expected) < 1e-5
    from safetensors.torch import load_file

    state = load_file(str(paths["weights"]))
    assert set(state) == set(fused.state_dict())
    torch.testing.assert_close(state["conv1.weight"], fused.conv1.weight, rtol=0, atol=0)


def test_export_artifacts_weights_fall_back_to_torch_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    fused = fx_lightning.fuse(prepared(TinyNet()))
    paths = export_artifacts(fused, (torch.randn(2, 1, 6, 6),), tmp_path, formats="weights", name="tiny")
    assert paths == {"weights": tmp_path / "tiny.pt"}
    state = torch.load(paths["weights"], weights_only=True)
    assert all(type(v) is Tensor for v in state.values())
    torch.testing.assert_close(state["fc.weight"], fused.fc.weight, rtol=0, atol=0)


def test_export_artifacts_fused_fallback_module(tmp_path: Path) -> None:
    model = prepared(ShapeBranch())
    fused = fx_lightning.fuse(model)
    assert not isinstance(fused, torch.fx.GraphModule)
    assert type(fused.body) is nn.Sequential  # under an untraced parent, children keep their classes
    x = torch.randn(3, 1, 6, 6)
    paths = export_artifacts(fused, (x,), tmp_path)
    assert set(paths) == {"pt2", "weights"}
    assert rel_err(torch.export.load(paths["pt2"]).module()(x), model(x)) < 1e-5


def test_export_artifacts_mismatch_raises(tmp_path: Path) -> None:
    with pytest.raises(
        RuntimeError,
        match=r"reloaded 'weights' artifact .*model.safetensors differs from the module: max abs error \S+, "
        r"max rel error \S+, tolerance rtol=1e-05, atol=1e-05",
    ):
        export_artifacts(Noisy().eval(), (torch.randn(4, 3),), tmp_path, formats=["weights"])
    with pytest.raises(RuntimeError, match=r"reloaded 'pt2' artifact .* max abs error"):
        export_artifacts(Noisy().eval(), (torch.randn(4, 3),), tmp_path, formats=["pt2"])


def test_export_artifacts_unexportable_module_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"export.export could not capture DataBranch: .*formats=\['weights"):
        export_artifacts(DataBranch(), (torch.randn(2, 3),), tmp_path, formats=["pt2"])


@pytest.mark.parametrize("owner", ["write_artifacts", "export_artifacts"])
def test_capture_failure_names_the_function_called(tmp_path: Path, owner: str) -> None:
    write = {"write_artifacts": write_artifacts, "export_artifacts": export_artifacts}[owner]
    with pytest.raises(RuntimeError, match=rf"^{owner}\(formats=\['pt2'\]\): torch.export.export could not capture "):
        write(DataBranch(), (torch.randn(2, 3),), tmp_path, formats=["pt2"])


def test_export_and_verify_capture_failure_names_export_and_verify(tmp_path: Path) -> None:
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"'pt2' artifact .* could not be checked"):
        report = fx_lightning.export_and_verify(
            DataBranch(), DataBranch(), (x,), tmp_path, [(x,)], ["pt2"], latency_budget_s=0
        )
    error = report.artifacts["pt2"].error
    assert error.startswith("it could not be made: RuntimeError: export_and_verify(formats=['pt2']): torch.export")
    assert "export_artifacts" not in error


@pytest.mark.parametrize("owner", ["write_artifacts", "export_artifacts"])
def test_missing_extra_names_the_function_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: str) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    write = {"write_artifacts": write_artifacts, "export_artifacts": export_artifacts}[owner]
    pip = r'pip install "fx-lightning\[onnx\]"'
    with pytest.raises(MissingExtraError, match=rf"^{owner}\(formats=\['onnx'\]\) needs onnx, onnxruntime .*{pip}"):
        write(nn.Linear(3, 2), (torch.randn(1, 3),), tmp_path, formats=["onnx"])
    assert list(tmp_path.iterdir()) == []


def test_export_artifacts_onnx_failure_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_export(*args: object, **kwargs: object) -> None:
        raise ValueError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match=r"formats=\['onnx'\]\) could not export Linear: ValueError: unsupported"):
        export_artifacts(nn.Linear(3, 2), (torch.randn(1, 3),), tmp_path, formats=["onnx"])


def test_export_artifacts_onnx_missing_names_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r'pip install "fx-lightning\[onnx\]"') as info:
        export_artifacts(nn.Linear(3, 2), (torch.randn(1, 3),), tmp_path, formats=["onnx"])
    assert isinstance(info.value, ModuleNotFoundError)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"module": "net"}, TypeError, r"export_artifacts\(module=...\) expects a torch.nn.Module, got str"),
        ({"example_inputs": torch.zeros(1, 3)}, TypeError, r"expects a tuple of positional inputs, got Tensor"),
        ({"formats": [1]}, TypeError, r"export_artifacts\(formats=\[1\]\) expects a list of format names"),
        ({"formats": ["pt2", "tflite"]}, ValueError, r"unknown format\(s\) \['tflite'\]\. Valid formats: \['pt2', "),
        ({"rtol": -1.0}, ValueError, r"export_artifacts\(rtol=-1.0\) expects a number >= 0"),
        ({"atol": float("nan")}, ValueError, r"export_artifacts\(atol=nan\) expects a number >= 0"),
        ({"name": "a/b"}, ValueError, r"export_artifacts\(name='a/b'\) expects a plain file name stem"),
        ({"name": ""}, ValueError, r"export_artifacts\(name=''\) expects a plain file name stem"),
    ],
)
def test_export_artifacts_invalid_arguments_raise(
    tmp_path: Path, kwargs: dict, error: type[Exception], match: str
) -> None:
    call = {"module": nn.Linear(3, 2), "example_inputs": (torch.randn(1, 3),), "directory": tmp_path, **kwargs}
    with pytest.raises(error, match=match):
        export_artifacts(**call)
    assert list(tmp_path.iterdir()) == []  # validated before anything is written


def test_check_close_reports_structure_mismatch(tmp_path: Path) -> None:
    a = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"'onnx' artifact .* returned 1 tensor\(s\), the module 2"):
        _check_close("onnx", tmp_path / "m.onnx", [a], [a, a], 1e-5, 1e-5)
    with pytest.raises(RuntimeError, match=r"'pt2' artifact .* returned shape \(3, 2\), the module \(2, 3\)"):
        _check_close("pt2", tmp_path / "m.pt2", [a.T], [a], 1e-5, 1e-5)
    _check_close("pt2", tmp_path / "m.pt2", [a + 1e-6], [a], 0.0, 1e-5)  # within atol: no error


# ----------------------------------------------------------------------------------------- checkpoint_state_dict


def assert_checkpoint_reproduces_fused(
    original: nn.Module, fresh: nn.Module, x: Tensor, rtol: float = 1e-5
) -> tuple[dict[str, Tensor], nn.Module]:
    fused = fx_lightning.fuse(original, (x,))
    state = checkpoint_state_dict(original, fused)
    reference = original.state_dict()
    assert list(state) == list(reference)
    for key, value in state.items():
        assert type(value) is Tensor
        assert value.shape == reference[key].shape
        assert value.dtype == reference[key].dtype
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        assert rel_err(fresh(x), fused(x)) < rtol
    return state, fused


def test_checkpoint_state_dict_tiny_net_matches_fused() -> None:
    model = prepared(TinyNet())
    x = torch.randn(3, 1, 6, 6)
    state, fused = assert_checkpoint_reproduces_fused(model, TinyNet(), x)
    assert {(r.bn, r.into) for r in fused.fusion_report.folded} == {("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "fc")}
    for layer in ("conv1", "conv2", "fc"):
        torch.testing.assert_close(state[f"{layer}.weight"], fused.get_submodule(layer).weight, rtol=0, atol=0)
    for bn, eps in (("bn1", 1e-5), ("bn2", 1e-3)):
        torch.testing.assert_close(state[f"{bn}.weight"], torch.ones(state[f"{bn}.weight"].shape), rtol=0, atol=0)
        assert float(state[f"{bn}.running_mean"].abs().max()) == 0.0
        torch.testing.assert_close(state[f"{bn}.running_var"] + eps, torch.ones_like(state[f"{bn}.running_var"]))
    # a layer with its own bias hands it to the BatchNorm
    assert float(state["conv2.bias"].abs().max()) == 0.0
    torch.testing.assert_close(state["bn2.bias"], fused.conv2.bias, rtol=0, atol=0)
    torch.testing.assert_close(state["bn1.bias"], fused.conv1.bias, rtol=0, atol=0)
    # nothing is shared with either network
    pointers = {t.data_ptr() for t in [*model.state_dict().values(), *fused.state_dict().values()]}
    assert not pointers & {t.data_ptr() for t in state.values()}
    # the original itself is unchanged
    assert float(model.bn1.running_var.sub(1).abs().max()) > 0.01


def test_checkpoint_state_dict_non_affine_bn_uses_layer_bias() -> None:
    def net() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, bias=True),
            nn.BatchNorm2d(3, affine=False),
            nn.Conv2d(3, 3, 1, bias=False),
            nn.BatchNorm2d(3, affine=False),
        )

    model = prepared(net())
    x = torch.randn(2, 1, 5, 5)
    state, fused = assert_checkpoint_reproduces_fused(model, net(), x)
    assert fused.fusion_report.num_folded == 2
    torch.testing.assert_close(state["0.weight"], fused.get_submodule("0").weight, rtol=0, atol=0)
    torch.testing.assert_close(state["0.bias"], fused.get_submodule("0").bias, rtol=0, atol=0)
    # no bias anywhere to carry the shift: the second pair keeps the original's values
    torch.testing.assert_close(state["2.weight"], model[2].weight, rtol=0, atol=0)
    torch.testing.assert_close(state["3.running_mean"], model[3].running_mean, rtol=0, atol=0)


class FunctionalBN(nn.BatchNorm2d):
    """A BatchNorm subclass calling ``F.batch_norm`` itself, as library norm-activation layers do."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


def test_checkpoint_state_dict_functional_batch_norm() -> None:
    def net() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), FunctionalBN(4), nn.Flatten(), nn.Linear(36, 3))

    model = prepared(net())
    x = torch.randn(2, 2, 5, 5)
    state, fused = assert_checkpoint_reproduces_fused(model, net(), x)
    assert [(r.bn, r.into) for r in fused.fusion_report.folded] == [("1", "0")]
    torch.testing.assert_close(state["0.weight"], fused.get_submodule("0").weight, rtol=0, atol=0)
    torch.testing.assert_close(state["1.running_var"], torch.full((4,), 1 - 1e-5))


class SharedConv(nn.Module):
    """One conv called twice, BN after one call only: the fused copy is renamed ``conv_folded1``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


def test_checkpoint_state_dict_keeps_renamed_folds_original_and_writes_following_folds() -> None:
    model = prepared(SharedConv())
    x = torch.randn(2, 2, 5, 5)
    state, fused = assert_checkpoint_reproduces_fused(model, SharedConv(), x)
    assert [r.into for r in fused.fusion_report.folded] == ["conv_folded1"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)

    def following(bias: bool) -> nn.Sequential:
        return nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 1, bias=bias))

    # BN -> conv: the conv takes the folded weight and bias, the BatchNorm becomes the identity.
    model = prepared(following(True))
    state, fused = assert_checkpoint_reproduces_fused(model, following(True), x)
    assert [r.rule for r in fused.fusion_report.folded] == ["fold_bn_into_following"]
    torch.testing.assert_close(state["1.weight"], fused.get_submodule("1").weight, rtol=0, atol=0)
    torch.testing.assert_close(state["0.bias"], torch.zeros(2), rtol=0, atol=0)
    # Without a conv bias there is nowhere to put the BatchNorm's shift: the original values stay.
    model = prepared(following(False))
    state, fused = assert_checkpoint_reproduces_fused(model, following(False), x)
    assert [p.written for p in checkpoint_plan(model, fused)] == [False]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


class TwoBranch(nn.Module):
    """RepVGG-style sum of a 3x3 and a 1x1 Conv-BN branch: the folded convs are then merged into one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(3)
        self.b = nn.Conv2d(3, 3, 1, bias=False)
        self.b_bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.a_bn(self.a(x)) + self.b_bn(self.b(x)))


def test_checkpoint_state_dict_merged_layers_keep_original_values() -> None:
    model = prepared(TwoBranch())
    state, fused = assert_checkpoint_reproduces_fused(model, TwoBranch(), torch.randn(2, 3, 5, 5))
    assert [m.into for m in fused.fusion_report.merged] == ["a"]
    assert fused.fusion_report.num_folded == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_checkpoint_state_dict_fused_fallback_module() -> None:
    model = prepared(ShapeBranch())
    x = torch.randn(3, 1, 6, 6)
    state, fused = assert_checkpoint_reproduces_fused(model, ShapeBranch(), x)
    assert {(r.bn, r.into) for r in fused.fusion_report.folded} == {("body.1", "body.0"), ("head.2", "head.1")}
    # The untraced root may read the BatchNorms' tensors: the checkpoint form keeps the original values.
    plans = checkpoint_plan(model, fused)
    assert [p.written for p in plans] == [False, False]
    assert all("untraced code" in p.reason for p in plans)
    torch.testing.assert_close(state["body.0.weight"], model.body.get_submodule("0").weight, rtol=0, atol=0)


def test_checkpoint_state_dict_resnet18() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    state, fused = assert_checkpoint_reproduces_fused(model, torchvision.models.resnet18(num_classes=10), x)
    assert fused.fusion_report.num_folded == 20
    torch.testing.assert_close(
        state["layer2.0.downsample.0.weight"],
        fused.layer2.get_submodule("0").downsample.get_submodule("0").weight,
        rtol=0,
        atol=0,
    )


def test_checkpoint_state_dict_invalid_arguments_raise() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(TypeError, match=r"checkpoint_state_dict\(original=...\) expects a torch.nn.Module, got dict"):
        checkpoint_state_dict({}, fx_lightning.fuse(net))
    with pytest.raises(TypeError, match=r"checkpoint_state_dict\(fused=...\) expects a torch.nn.Module, got str"):
        checkpoint_state_dict(net, "fused")
    with pytest.raises(TypeError, match=r"expects the module returned by fx_lightning.fuse\(\).*Sequential without"):
        checkpoint_state_dict(net, net)


# ----------------------------------------------------------------------------------------- dynamic batch


class FixedBatch(nn.Module):
    """Reshapes to a constant batch size, so it cannot run on another one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x).reshape(4, 2)


class BatchBranch(FixedBatch):
    """Branches on the batch size: eager code runs on any batch, the export specialises to the example's."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) if x.shape[0] == 4 else -self.fc(x)


def test_export_artifacts_dynamic_batch_accepts_other_batch_sizes(tmp_path: Path) -> None:
    fused = fx_lightning.fuse(prepared(TinyNet()))
    paths = export_artifacts(fused, (torch.randn(2, 1, 6, 6),), tmp_path, formats=["onnx", "pt2"], dynamic_batch=True)
    x = torch.randn(5, 1, 6, 6)
    assert rel_err(torch.export.load(paths["pt2"]).module()(x), fused(x)) < 1e-5
    import onnxruntime

    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # a symbolic batch dimension
    onnx_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert rel_err(onnx_out, fused(x)) < 1e-5


def test_export_artifacts_dynamic_batch_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dynamic_batch=True\) needs example inputs with batch size >= 2, got .*1"):
        export_artifacts(nn.Linear(3, 2), (torch.randn(1, 3),), tmp_path, formats=["pt2"], dynamic_batch=True)
    with pytest.raises(TypeError, match=r"export_artifacts\(dynamic_batch='yes'\) expects True or False"):
        export_artifacts(nn.Linear(3, 2), (torch.randn(2, 3),), tmp_path, dynamic_batch="yes")
    with pytest.raises(RuntimeError, match=r"dynamic_batch=True\): FixedBatch itself fails on a batch twice as large"):
        export_artifacts(FixedBatch(), (torch.randn(4, 3),), tmp_path, formats=["pt2"], dynamic_batch=True)
    with pytest.raises(RuntimeError, match=r"reloaded 'pt2' artifact .* does not accept a batch of another size"):
        export_artifacts(BatchBranch(), (torch.randn(4, 3),), tmp_path, formats=["pt2"], dynamic_batch=True)


# ----------------------------------------------------------------------------------------- formats and options


def test_export_artifacts_formats_come_from_the_registry(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown format\(s\) \['tflite'\]\. Valid formats: \['pt2', 'onnx', 'aoti', 'openvino', 'weights'\]",
    ):
        export_artifacts(nn.Linear(3, 2), (torch.randn(2, 3),), tmp_path, formats=["tflite"])
    assert list(tmp_path.iterdir()) == []


def test_export_artifacts_onnx_at_an_optimisation_level(tmp_path: Path) -> None:
    fused = fx_lightning.fuse(prepared(TinyNet()))
    options = {"onnx": {"optimization_level": "disable_all", "threads": 1}}
    paths = export_artifacts(fused, (torch.randn(2, 1, 6, 6),), tmp_path, formats=["onnx"], options=options)
    assert paths == {"onnx": tmp_path / "model.onnx"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"module": "net"}, TypeError, r"write_artifacts\(module=...\) expects a torch.nn.Module, got str"),
        ({"formats": ["pt2", "tflite"]}, ValueError, r"write_artifacts\(formats=\['pt2', 'tflite'\]\) names unknown"),
        ({"dynamic_batch": 1}, TypeError, r"write_artifacts\(dynamic_batch=1\) expects True or False"),
        ({"name": "a/b"}, ValueError, r"write_artifacts\(name='a/b'\) expects a plain file name stem"),
        ({"options": [("onnx", {})]}, TypeError, r"write_artifacts\(options=\[\('onnx', \{\}\)\]\) expects a dict"),
    ],
)
def test_write_artifacts_invalid_arguments_raise(
    tmp_path: Path, kwargs: dict, error: type[Exception], match: str
) -> None:
    call = {"module": nn.Linear(3, 2), "example_inputs": (torch.randn(2, 3),), "directory": tmp_path, **kwargs}
    with pytest.raises(error, match=match):
        write_artifacts(**call)
    assert list(tmp_path.iterdir()) == []


def test_check_close_is_relative_to_each_outputs_scale_and_lists_varying_counts(tmp_path: Path) -> None:
    big = torch.tensor([1e7, -3e7, 5.0])
    # float32 rounding at 1e7 (866) is far above any absolute tolerance, and 3e-5 of the scale
    _check_close("onnx", tmp_path / "m.onnx", [big + torch.tensor([866.0, 0.0, 0.0])], [big], 1e-4, 0.0)
    with pytest.raises(RuntimeError, match=r"max rel error 1\.000e-02, tolerance rtol=0\.0001"):
        _check_close("onnx", tmp_path / "m.onnx", [big * 1.01], [big], 1e-4, 0.0)
    boxes = torch.ones(3, 4)
    with pytest.warns(UserWarning, match=r"returned 1 output\(s\) of another shape .*verify_artifacts"):
        _check_close("onnx", tmp_path / "m.onnx", [boxes[:2], boxes], [boxes, boxes], 1e-4, 0.0)

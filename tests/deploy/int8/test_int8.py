"""int8 artifacts: ONNX Runtime static quantization of the float ONNX file, calibrated on training batches and
gated by the task metric, with layers kept in float while over budget."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fx_lightning import FuseOnExport


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
    assert entry["latency_ms"] > 0
    assert entry["latency_ratio"] > 0
    assert entry["latency_ratio_base"] > 0
    int8 = entry["int8"]
    assert int8["calibration_batches"] == 2
    assert int8["calibration_samples"] == 256
    assert int8["calibration_s"] > 0
    assert int8["layers"] == 4  # three convolutions and the linear head
    assert int8["float_layers"] == []
    assert len(int8["attempts"]) == 1
    assert set(callback.last_result.artifacts) == {"pt2", "onnx", "onnx-int8"}
    table = callback.last_result.deploy_table
    assert "vs float" in table
    assert "onnx-int8" in table

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


def _fit(
    tiny_cnn: Any, digits: Any, make_trainer: Any, directory: Path, **kwargs: Any
) -> tuple[Any, FuseOnExport, Any]:
    model = tiny_cnn(width=8)
    callback = FuseOnExport(export_dir=str(directory), export_formats=["onnx"], deploy_latency_budget=0, **kwargs)
    trainer = make_trainer(callbacks=[callback], limit_val_batches=2)
    trainer.fit(model, datamodule=digits)
    return model, callback, trainer


def test_int8_calibration_leaves_the_model_its_batch_norm_statistics_and_the_random_state_as_without_it(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    # Calibration reads shuffled training batches (a draw from torch's generator) after training: the same seeded
    # run without int8 must end with the same weights, BatchNorm statistics and random numbers.
    plain, _, plain_trainer = _fit(tiny_cnn, digits, make_trainer, tmp_path / "plain")
    after_plain = (torch.rand(4), np.random.rand(), __import__("random").random())
    quantized, callback, trainer = _fit(
        tiny_cnn, digits, make_trainer, tmp_path / "int8", int8={"calibration_batches": 3, "max_metric_drop": 1.0}
    )
    after_int8 = (torch.rand(4), np.random.rand(), __import__("random").random())
    # the training loader's own generator (DigitsDataModule shuffles with a seeded one) is left as without int8:
    # a further epoch would shuffle alike
    shuffles = [t.train_dataloader.generator.get_state() for t in (plain_trainer, trainer)]
    assert torch.equal(*shuffles)
    assert "onnx-int8" in callback.last_result.artifacts  # calibration did run
    assert torch.equal(after_plain[0], after_int8[0])
    assert after_plain[1:] == after_int8[1:]
    assert quantized.training == plain.training
    mine, theirs = quantized.state_dict(), plain.state_dict()
    assert list(mine) == list(theirs)
    for key in mine:  # weights, running_mean, running_var, num_batches_tracked
        assert torch.equal(mine[key], theirs[key]), key
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in quantized.net.modules())


def test_int8_at_test_calibrates_on_the_datamodule_training_split(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    callback = FuseOnExport(
        export_dir=str(tmp_path / "out"),
        export_formats=["onnx"],
        export_stages=["test"],
        int8={"calibration_batches": 1, "max_metric_drop": 1.0},
        deploy_latency_budget=0,
    )
    make_trainer(callbacks=[callback], limit_test_batches=1).test(tiny_cnn(width=8), datamodule=digits)
    entry = callback.last_result.deploy["artifacts"]["onnx-int8"]
    assert entry["int8"]["calibration_samples"] == 128  # one training batch of 128
    assert entry["verification"]["num_samples"] == 270  # the validation split, as the fused network's check


def test_int8_without_training_data_is_skipped_with_a_note(tiny_cnn: Any, make_trainer: Any, tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))), batch_size=32)
    callback = FuseOnExport(
        export_dir=str(tmp_path / "out"),
        export_formats=["onnx"],
        export_stages=["test"],
        int8={"max_metric_drop": 1.0},
        deploy_latency_budget=0,
    )
    make_trainer(callbacks=[callback]).test(tiny_cnn(width=8), dataloaders=data)
    result = callback.last_result
    assert set(result.artifacts) == {"onnx"}
    assert any("int8 not made: no training data to calibrate on in `trainer.test`" in n for n in result.notes)


def test_int8_calibrates_on_a_given_calibration_dataloader(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    given = [(torch.rand(16, 1, 8, 8) * 16, torch.zeros(16, dtype=torch.long)) for _ in range(5)]
    _, callback, _ = _fit(
        tiny_cnn,
        digits,
        make_trainer,
        tmp_path,
        int8={"calibration_batches": 3, "max_metric_drop": 1.0},
        calibration_dataloader=given,
    )
    int8 = callback.last_result.deploy["artifacts"]["onnx-int8"]["int8"]
    assert int8["calibration_batches"] == 3
    assert int8["calibration_samples"] == 48


@pytest.mark.parametrize(
    ("int8", "error", "match"),
    [
        (
            {"formats": ["pt2"]},
            ValueError,
            r"FuseOnExport\(int8=\.\.\.\): formats=\['pt2'\] names .*\['onnx', 'aoti'\]",
        ),
        ({"budget": 0.1}, ValueError, r"FuseOnExport\(int8=\{'budget': 0\.1\}\) has unknown key\(s\) \['budget'\]"),
        ({"max_metric_drop": -0.1}, ValueError, r"max_metric_drop=-0\.1 expects a finite number >= 0"),
        ("onnx", TypeError, r"FuseOnExport\(int8='onnx'\) expects a dict of int8 options"),
    ],
)
def test_fuse_on_export_rejects_bad_int8_options_before_training(int8: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FuseOnExport(int8=int8)


def test_int8_aoti_with_torchao_compiles_a_package_checked_in_aoti(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    pytest.importorskip("torchao", reason="the torchao extra: pip install 'fx-lightning[torchao]'")
    from torch._inductor import config as inductor_config

    pass_before = inductor_config.pre_grad_custom_pass
    model = tiny_cnn(width=8)
    callback = FuseOnExport(
        export_dir=str(tmp_path / "out"),
        export_formats=[],
        int8={"formats": ["aoti"], "calibration_batches": 2, "max_metric_drop": 0.05},
        deploy_latency_budget=0.1,
    )
    make_trainer(callbacks=[callback], limit_val_batches=2).fit(model, datamodule=digits)
    artifacts = callback.last_result.deploy["artifacts"]
    assert list(artifacts) == ["aoti", "aoti-int8"]
    entry = artifacts["aoti-int8"]
    assert entry["verification"]["passed"], entry
    assert entry["path"] == str(tmp_path / "out" / "net.aoti.int8.pt2")
    assert entry["runtime"].endswith("int8 PT2E x86 Inductor")
    assert entry["verification"]["max_abs_diff"] > 1e-4  # quantized, not the float package again
    assert entry["int8"]["layers"] == 4
    assert entry["latency_ratio_base"] > 0
    loaded = torch._inductor.aoti_load_package(entry["path"])
    x = next(iter(digits.val_dataloader()))[0][:3]
    with torch.no_grad():
        expected = model.eval()(x)
    out = loaded(x)
    assert inductor_config.pre_grad_custom_pass is pass_before  # torchao's global pass is not left behind
    assert out.shape == (3, 10)
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 2 / 3


@pytest.mark.parametrize(
    ("fmt", "hidden", "extra"),
    [("aoti", "torchao", "torchao"), ("onnx", "onnxruntime", "onnx")],
)
def test_int8_without_its_extra_names_the_extra_before_training(
    fmt: str, hidden: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from fx_lightning.deploy.formats import MissingExtraError

    for name in [m for m in sys.modules if m == hidden or m.startswith(hidden + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, hidden, None)  # import fails as when it is not installed
    with pytest.raises(
        MissingExtraError,
        match=rf"FuseOnExport\(int8=\.\.\.\) with formats=\['{fmt}'\]: .*pip install "
        rf'"fx-lightning\[{extra}\]"',
    ):
        FuseOnExport(int8={"formats": [fmt]})


@pytest.mark.slow
def test_resnet18_int8_config_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fx_lightning.lightning.cli import run

    config = Path(__file__).resolve().parents[3] / "configs" / "resnet18_int8.yaml"
    monkeypatch.chdir(tmp_path)  # the config writes under runs/, relative to the working directory
    cli: Any = run(["fit", "--config", str(config), "--trainer.enable_progress_bar=false"])
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FuseOnExport))
    fit = callback.history[0]  # as fuse_report.json holds it
    assert list(fit["artifacts"]) == ["onnx", "onnx-int8", "ckpt"]
    assert fit["latency"]["batch_size"] == 8
    entry = fit["artifacts"]["onnx-int8"]
    assert entry["verification"]["passed"]
    assert abs(entry["verification"]["metric_drop"]["MulticlassAccuracy"]) <= 0.01
    assert entry["verification"]["metric_original"]["MulticlassAccuracy"] > 0.8  # a trained network
    assert entry["int8"]["calibration_batches"] == 16
    assert entry["latency_ratio_base"] > 0  # timed beside the float file (figures in the README, not asserted)
    assert fit["artifacts"]["onnx"]["verification"]["passed"]
    assert fit["artifacts"]["ckpt"]["verification"]["passed"]


def _tiny_classifier() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 3),
    ).eval()
    xs = [torch.randn(8, 1, 4, 4) for _ in range(3)]
    with torch.no_grad():
        return net, [(x, net(x).argmax(1)) for x in xs]


def test_int8_without_a_task_metric_fails_instead_of_passing_on_outputs(tmp_path: Path) -> None:
    from fx_lightning import fuse
    from fx_lightning.deploy.flow import ArtifactMismatchWarning, export_and_verify

    net, data = _tiny_classifier()
    x = data[0][0]
    with pytest.warns(ArtifactMismatchWarning, match=r"'onnx-int8' .* could not be checked: no task metric"):
        report = export_and_verify(
            net,
            fuse(net, (x,)),
            (x,),
            tmp_path,
            data,
            formats=["onnx"],
            get_target=lambda batch: None,
            int8={"max_metric_drop": 100.0},
            calibration=data,
            latency_budget_s=0,
        )
    assert set(report.announced()) == {"onnx"}  # outputs alone never pass an int8 budget, however loose


def test_int8_that_cannot_be_made_never_reports_an_earlier_run_file(tmp_path: Path) -> None:
    from fx_lightning import fuse
    from fx_lightning.deploy.flow import ArtifactMismatchWarning, export_and_verify

    net, data = _tiny_classifier()
    x = data[0][0]
    (tmp_path / "model.int8.onnx").write_bytes(b"an earlier run's file")
    (tmp_path / "model.int8.FAILED.onnx").write_bytes(b"an earlier run's failure")
    wrong = [(torch.randn(8, 2, 4, 4), None)]  # two channels: the ONNX file takes one, calibration fails
    with pytest.warns(ArtifactMismatchWarning, match=r"int8 quantization failed"):
        report = export_and_verify(
            net,
            fuse(net, (x,)),
            (x,),
            tmp_path,
            data,
            formats=["onnx"],
            int8={},
            calibration=wrong,
            latency_budget_s=0,
        )
    assert not (tmp_path / "model.int8.onnx").exists()
    assert not (tmp_path / "model.int8.FAILED.onnx").exists()
    assert set(report.announced()) == {"onnx"}
    assert report.artifacts["onnx-int8"].error.startswith("int8 quantization failed")


@pytest.mark.parametrize(("max_float_layers", "announced"), [(4, True), (0, False)])
def test_fuse_on_export_keeps_a_sensitive_layer_in_float_or_does_not_announce_int8(
    max_float_layers: int, announced: bool, make_trainer: Any, tmp_path: Path
) -> None:
    import lightning.pytorch as pl
    from test_int8_gate import BUDGET, accuracy, labelled, sensitive_net
    from torch.utils.data import DataLoader, TensorDataset

    from fx_lightning.deploy.flow import ArtifactMismatchWarning

    class Module(pl.LightningModule):  # a network whose first convolution cannot take an int8 input
        def __init__(self) -> None:
            super().__init__()
            self.net = sensitive_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    model = Module().eval()
    data = labelled(model.net, 4, seed=1)
    callback = FuseOnExport(
        metric=accuracy(),
        export_dir=str(tmp_path / "out"),
        export_formats=["onnx"],
        export_stages=["test"],
        verify_dataloader=data,
        calibration_dataloader=labelled(model.net, 4, seed=2),
        int8={"max_metric_drop": BUDGET, "max_float_layers": max_float_layers},
        deploy_latency_budget=0,
    )
    loader = DataLoader(TensorDataset(*(torch.cat(parts) for parts in zip(*data))), batch_size=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(callbacks=[callback]).test(model, dataloaders=loader)
    entry = callback.last_result.deploy["artifacts"]["onnx-int8"]
    int8 = entry["int8"]
    assert int8["attempts"][0]["passed"] is False  # every layer quantized: over budget
    assert int8["attempts"][0]["worst_drop"] > BUDGET
    assert ("onnx-int8" in callback.last_result.artifacts) is announced
    mismatches = [str(w.message) for w in record if issubclass(w.category, ArtifactMismatchWarning)]
    if announced:
        assert int8["float_layers"][0].startswith("0 (")  # the first convolution, by its module path
        assert entry["verification"]["passed"]
        assert not mismatches
    else:
        assert int8["float_layers"] == []
        assert (tmp_path / "out" / "net.int8.FAILED.onnx").is_file()
        assert len(mismatches) == 1
        assert "missed by" in mismatches[0]
        assert "onnx" in callback.last_result.artifacts  # the float file is still handed out


def test_int8_calibration_data_that_cannot_be_read_fails_only_the_int8_artifact(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    given = [{"pixels": torch.zeros(4, 1, 8, 8)}]  # no key the default get_input knows
    with pytest.warns(UserWarning, match=r"'onnx-int8' artifact .* could not be checked: int8 could not be made: "):
        _, callback, _ = _fit(
            tiny_cnn, digits, make_trainer, tmp_path, int8={"max_metric_drop": 1.0}, calibration_dataloader=given
        )
    assert set(callback.last_result.artifacts) == {"onnx"}  # the float file is checked and handed out
    assert (tmp_path / "net.onnx").is_file()
    assert not (tmp_path / "net.FAILED.onnx").exists()
    assert not callback.last_result.error

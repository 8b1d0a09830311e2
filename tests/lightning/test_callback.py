"""FuseOnExport with lightning.pytorch: when it fuses, what runs fused, what is put back, what checkpoints hold."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from fx_lightning import FuseOnExport, count_kernels
from fx_lightning.deploy.export import MissingExtraError
from fx_lightning.deploy.flow import ArtifactMismatchWarning
from fx_lightning.examples.models import DigitsCNN
from fx_lightning.lightning.callback import LEGACY_UNFUSED_STATE_KEY, Outcome, is_fused, restore_original

#: Test metrics of the fused and unfused networks may differ by this much (accuracy over 270 digits).
METRIC_TOLERANCE = 1e-3


def runs_fused(pl_module: Any) -> bool:
    """Whether ``pl_module.net`` is a fused network in place: the user's class, no BatchNorm left."""
    net = pl_module.net
    return (
        is_fused(pl_module)
        and type(net) is nn.Sequential
        and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    )


class FusedProbe(pl.Callback):
    """Records, after every test/predict step, whether ``pl_module.net`` is a fused network: FuseOnExport, last
    in the callbacks, swaps in at each batch start and back at each batch end after this hook."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_test_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.seen.append(runs_fused(pl_module))

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.seen.append(runs_fused(pl_module))


def assert_original(model: DigitsCNN, x: torch.Tensor, net: nn.Module | None = None) -> None:
    """The module has its original architecture (the very object ``net`` when given): all three BatchNorms."""
    assert not is_fused(model)
    assert type(model.net) is nn.Sequential
    if net is not None:
        assert model.net is net
    assert count_kernels(model.net.eval(), x) == 3
    assert list(model.state_dict()) == list(DigitsCNN(width=4).state_dict())


def sample(digits: Any, n: int = 32) -> torch.Tensor:
    digits.setup("test")
    return digits.test_set.tensors[0][:n]


def unfused_test_acc(ckpt: str | Path, digits: Any, make_trainer: Any) -> float:
    model = DigitsCNN.load_from_checkpoint(ckpt)
    return make_trainer().test(model, datamodule=digits, verbose=False)[0]["test_acc"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short run with the callback, shared by the tests that only read its checkpoints and artifacts."""
    from conftest import TRAINER_DEFAULTS
    from fx_lightning.examples.data import DigitsDataModule

    root = tmp_path_factory.mktemp("trained")
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN(width=4, lr=0.05)
    net = model.net
    checkpoint = ModelCheckpoint(dirpath=root / "ckpts", monitor="val_acc", mode="max", save_top_k=1)
    callback = FuseOnExport(export_dir=str(root / "fused"), export_formats=["ckpt"])
    trainer = pl.Trainer(
        **(TRAINER_DEFAULTS | {"max_epochs": 2, "enable_checkpointing": True, "default_root_dir": root}),
        callbacks=[checkpoint, callback],
    )
    dm = DigitsDataModule(batch_size=128)
    trainer.fit(model, datamodule=dm)
    after_fit = root / "after_fit.ckpt"
    trainer.save_checkpoint(after_fit)
    return {
        "best": checkpoint.best_model_path,
        "after_fit": after_fit,
        "deploy": callback.last_result.artifacts["ckpt"],
        "callback": callback,
        "model": model,
        "net": net,
        "root": root,
    }


def test_fuse_on_export_fit_then_test_best_runs_fused_and_matches_unfused(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    model = tiny_cnn()
    net = model.net
    probe, checkpoint = FusedProbe(), ModelCheckpoint(monitor="val_acc", mode="max")
    callback = FuseOnExport(export_formats=[])
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(
        max_epochs=2,
        enable_checkpointing=True,
        logger=logger,
        callbacks=[probe, checkpoint, callback],
    )
    trainer.fit(model, datamodule=digits)

    # After fit: the user's own network in place; the fused copy verified and kept on the callback.
    x = sample(digits)
    assert_original(model, x, net)
    fused = callback.fused["net"]
    assert type(fused) is nn.Sequential
    assert fused is not net
    assert count_kernels(fused, x) == 0
    fit_result = callback.last_result
    assert fit_result is not None
    assert fit_result.stage == "fit"
    assert fit_result.outcome is Outcome.FUSED
    assert fit_result.num_folded == 3
    assert (fit_result.kernels_before, fit_result.kernels_after) == (3, 0)
    assert fit_result.verification is not None
    assert fit_result.verification.num_samples == 270
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    logged = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "fuse/folded" in logged
    assert "fuse/MulticlassAccuracy_fused" in logged
    assert "fuse/max_rel_diff" in logged
    assert "max rel diff" in str(fit_result)
    report = json.loads((Path(logger.log_dir) / "fused" / "fuse_report.json").read_text())
    assert report["stage"] == "fit"
    assert report["outcome"] == "fused"
    assert report["num_folded"] == 3

    results = trainer.test(datamodule=digits, ckpt_path="best", verbose=False)
    assert probe.seen
    assert all(probe.seen)
    assert callback.last_result.ckpt_path == checkpoint.best_model_path
    reference = unfused_test_acc(checkpoint.best_model_path, digits, make_trainer)
    assert abs(results[0]["test_acc"] - reference) <= METRIC_TOLERANCE
    assert_original(model, x, net)


def test_fuse_on_export_test_model_without_checkpoint(trained: dict[str, Any], digits: Any, make_trainer: Any) -> None:
    model = DigitsCNN.load_from_checkpoint(trained["best"])
    probe = FusedProbe()
    results = make_trainer(callbacks=[probe, FuseOnExport(export_formats=[])]).test(
        model, datamodule=digits, verbose=False
    )
    assert probe.seen
    assert all(probe.seen)
    reference = unfused_test_acc(trained["best"], digits, make_trainer)
    assert abs(results[0]["test_acc"] - reference) <= METRIC_TOLERANCE
    assert_original(model, sample(digits))


def test_fuse_on_export_test_ckpt_path_on_fresh_trainer(
    trained: dict[str, Any], tiny_cnn: Any, digits: Any, make_trainer: Any
) -> None:
    model = tiny_cnn(seed=123)  # different weights: the checkpoint must be what gets fused
    probe, callback = FusedProbe(), FuseOnExport(export_formats=[])
    results = make_trainer(callbacks=[probe, callback]).test(
        model, datamodule=digits, ckpt_path=trained["best"], verbose=False
    )
    assert probe.seen
    assert all(probe.seen)
    assert callback.last_result.ckpt_path == str(trained["best"])
    reference = unfused_test_acc(trained["best"], digits, make_trainer)
    assert abs(results[0]["test_acc"] - reference) <= METRIC_TOLERANCE
    assert_original(model, sample(digits))


def test_fuse_on_export_predict_matches_unfused(trained: dict[str, Any], digits: Any, make_trainer: Any) -> None:
    model = DigitsCNN.load_from_checkpoint(trained["best"])
    probe = FusedProbe()
    fused = make_trainer(callbacks=[probe, FuseOnExport(export_formats=[])]).predict(model, datamodule=digits)
    reference = make_trainer().predict(DigitsCNN.load_from_checkpoint(trained["best"]), datamodule=digits)
    assert probe.seen
    assert all(probe.seen)
    torch.testing.assert_close(torch.cat(fused), torch.cat(reference), rtol=1e-4, atol=1e-5)
    assert_original(model, sample(digits))


def test_fuse_on_export_fit_leaves_the_users_network_and_state_dict(trained: dict[str, Any], digits: Any) -> None:
    model = trained["model"]
    assert_original(model, sample(digits), trained["net"])
    assert restore_original(model) is False  # nothing to put back after fit
    # The state dict is the ordinary one: the BatchNorm statistics are the trained ones, not folded.
    saved = torch.load(trained["after_fit"], weights_only=True)
    assert list(saved["state_dict"]) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    assert not torch.allclose(saved["state_dict"]["net.0.1.running_mean"], torch.zeros(4))
    assert LEGACY_UNFUSED_STATE_KEY not in saved


def test_fuse_on_export_deploy_checkpoint_loads_strictly_with_fused_outputs(
    trained: dict[str, Any], digits: Any
) -> None:
    x = sample(digits)
    fused_net = trained["callback"].fused["net"]
    with torch.no_grad():
        expected = fused_net(x)
    assert Path(trained["deploy"]).parent == trained["root"] / "fused"
    loaded = DigitsCNN.load_from_checkpoint(trained["deploy"], strict=True)  # the user's own class
    assert type(loaded.net) is nn.Sequential
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), expected, rtol=1e-5, atol=1e-5)

    checkpoint = torch.load(trained["deploy"], weights_only=True)
    assert list(checkpoint["state_dict"]) == list(DigitsCNN(width=4).state_dict())
    # Folded values: each BatchNorm is the identity carrying the bias.
    assert torch.equal(checkpoint["state_dict"]["net.0.1.running_mean"], torch.zeros(4))
    assert checkpoint["hyper_parameters"]["width"] == 4
    # The user's model is not the deploy form.
    assert not torch.equal(trained["model"].state_dict()["net.0.1.running_mean"], torch.zeros(4))


def test_fuse_on_export_legacy_fused_checkpoint_resumes_from_unfused_weights(trained: dict[str, Any]) -> None:
    deploy = torch.load(trained["deploy"], weights_only=True)
    unfused = {k: v for k, v in trained["model"].state_dict().items() if k.startswith("net.")}
    checkpoint = {"state_dict": deploy["state_dict"], LEGACY_UNFUSED_STATE_KEY: unfused}
    model = DigitsCNN(width=4)
    model.load_state_dict(checkpoint["state_dict"])  # what Lightning's restore does first: folded weights
    FuseOnExport().on_load_checkpoint(None, model, checkpoint)
    for key, value in unfused.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_fuse_on_export_every_checkpoint_opens_with_weights_only(trained: dict[str, Any]) -> None:
    paths = sorted(Path(trained["root"]).rglob("*.ckpt"))
    assert len(paths) >= 3  # best, after_fit, deploy
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        assert "state_dict" in checkpoint


def test_fuse_on_export_checkpoints_during_training_are_unchanged(trained: dict[str, Any]) -> None:
    checkpoint = torch.load(trained["best"], weights_only=True)
    assert LEGACY_UNFUSED_STATE_KEY not in checkpoint
    assert list(checkpoint["state_dict"]) == list(DigitsCNN(width=4).state_dict())
    # Trained (not identity) BatchNorm statistics: the ordinary, unfused weights.
    assert not torch.allclose(checkpoint["state_dict"]["net.0.1.running_mean"], torch.zeros(4))


def test_fuse_on_export_resume_mid_training_matches_run_without_callback(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "mid", save_top_k=-1, every_n_epochs=1)
    make_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint, FuseOnExport(export_formats=[])]).fit(
        tiny_cnn(), datamodule=digits
    )
    mid = checkpoint.best_model_path or next((tmp_path / "mid").glob("*.ckpt"))

    finals = []
    for callbacks in ([FuseOnExport(export_formats=[])], []):
        model = tiny_cnn(seed=7)
        pl.seed_everything(1, verbose=False)
        make_trainer(max_epochs=2, callbacks=callbacks).fit(model, datamodule=digits, ckpt_path=mid)
        finals.append(model.state_dict())
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_fuse_on_export_training_again_after_fusion_starts_from_original(
    tiny_cnn: Any, digits: Any, make_trainer: Any
) -> None:
    class TrainProbe(pl.Callback):
        def __init__(self) -> None:
            self.batch_norms: list[int] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.batch_norms.append(sum(isinstance(m, nn.BatchNorm2d) for m in pl_module.net.modules()))

    model = tiny_cnn()
    net = model.net
    make_trainer(callbacks=[FuseOnExport(export_formats=[])]).fit(model, datamodule=digits)
    probe = TrainProbe()
    make_trainer(max_epochs=2, callbacks=[probe, FuseOnExport(export_formats=[])]).fit(model, datamodule=digits)
    assert probe.batch_norms == [3] * len(probe.batch_norms)  # every training step had the three original BatchNorms
    assert len(probe.batch_norms) == 6
    assert model.net is net


def test_fuse_on_export_tolerance_negative_reverts_by_default(tiny_cnn: Any, digits: Any, make_trainer: Any) -> None:
    model, callback = tiny_cnn(), FuseOnExport(tolerance=-1, export_formats=[])
    with pytest.warns(UserWarning, match=r"on_mismatch='revert'\): the fused network failed verification before fit"):
        make_trainer(callbacks=[callback]).fit(model, datamodule=digits)
    assert callback.last_result.outcome is Outcome.REVERTED
    assert callback.fused == {}
    assert_original(model, sample(digits))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strict": True}, r"FuseOnExport\(strict=True\): the fused network failed verification before fit"),
        ({"on_mismatch": "raise"}, r"FuseOnExport\(on_mismatch='raise'\): the fused network failed verification"),
    ],
)
def test_fuse_on_export_tolerance_negative_raises_in_strict_or_raise_mode(
    tiny_cnn: Any, digits: Any, make_trainer: Any, kwargs: dict[str, Any], match: str
) -> None:
    model = tiny_cnn()
    with pytest.raises(RuntimeError, match=match):
        make_trainer(callbacks=[FuseOnExport(tolerance=-1, export_formats=[], **kwargs)]).fit(model, datamodule=digits)
    assert_original(model, sample(digits))


class SignFlip(nn.Module):
    """Conv-BN network whose Python-side call counter flips the logits' sign on every call.

    Tracing runs ``forward`` once and bakes the sign of that call into the graph, so the fused network
    computes something else than the original's next calls: a real "eval forward differs after tracing".
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 64, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sign = 1.0 if self.calls % 2 else -1.0
        return self.head(self.body(x)) * sign


class SignFlipModule(DigitsCNN):
    def __init__(self) -> None:
        super().__init__(width=4)
        self.net = SignFlip()


def test_fuse_on_export_network_differing_after_tracing_reverts(digits: Any, make_trainer: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model, callback = SignFlipModule(), FuseOnExport(export_formats=[])
    # The fold itself agrees where it happens (in 'body'); the whole network does not, which fuse reports.
    with pytest.warns(RuntimeWarning, match=r"output is not a function of its inputs .* the unfused copy"):
        make_trainer(callbacks=[callback]).fit(model, datamodule=digits)
    assert callback.last_result.outcome is Outcome.NOTHING_FOLDED
    assert isinstance(model.net, SignFlip)
    assert not is_fused(model)


def test_fuse_on_export_on_mismatch_warn_keeps_fused(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    model, callback = tiny_cnn(), FuseOnExport(tolerance=-1, on_mismatch="warn", export_dir=str(tmp_path / "out"))
    trainer = make_trainer(callbacks=[callback])
    with (
        pytest.warns(UserWarning, match=r"on_mismatch='warn'\).*Using the fused network anyway"),
        pytest.warns(ArtifactMismatchWarning, match=r"the 'pt2' artifact .* kept as .*net\.FAILED\.pt2"),
    ):
        trainer.fit(model, datamodule=digits)
    assert callback.last_result.outcome is Outcome.KEPT_DESPITE_MISMATCH
    # The artifacts are checked with the same (impossible) tolerance: written, kept under FAILED names, not announced.
    assert callback.last_result.artifacts == {}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.FAILED.*")) == [
        "deploy.FAILED.ckpt",
        "net.FAILED.pt2",
        "net.FAILED.safetensors",
    ]
    assert not is_fused(model)  # after fit the user's network is in place, whatever the outcome
    probe = FusedProbe()
    trainer.callbacks.append(probe)
    with pytest.warns(UserWarning, match=r"on_mismatch='warn'\).*before test"):
        trainer.test(model, datamodule=digits, verbose=False)
    assert probe.seen
    assert all(probe.seen)


def test_fuse_on_export_export_pt2_and_onnx_reload_and_match(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    model = tiny_cnn()
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["pt2", "weights", "onnx", "ckpt"])
    make_trainer(callbacks=[callback]).fit(model, datamodule=digits)
    artifacts = callback.last_result.artifacts
    assert set(artifacts) == {"pt2", "weights", "onnx", "ckpt"}
    assert Path(artifacts["ckpt"]) == tmp_path / "out" / "deploy.ckpt"
    entries = json.loads((tmp_path / "out" / "fuse_report.json").read_text())["artifacts"]
    assert {fmt: entry["path"] for fmt, entry in entries.items()} == artifacts
    assert all(entry["verification"]["passed"] for entry in entries.values())

    x = sample(digits, 128)
    program = torch.export.load(artifacts["pt2"]).module()
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(artifacts["onnx"], providers=["CPUExecutionProvider"])
    for batch in (x, x[:7]):  # the example's batch size and another one: the batch dimension is dynamic
        with torch.no_grad():
            expected = callback.fused["net"](batch)
        atol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(program(batch), expected, rtol=1e-5, atol=atol)
        (onnx_out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-5, atol=atol)

    if artifacts["weights"].endswith(".safetensors"):
        from safetensors.torch import load_file

        weights = load_file(artifacts["weights"])
    else:
        weights = torch.load(artifacts["weights"], weights_only=True)
    assert isinstance(weights, dict)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fuse_on_export_bf16_precision_fuses_and_tests(
    tiny_cnn: Any, digits: Any, make_trainer: Any, precision: str
) -> None:
    model, probe = tiny_cnn(), FusedProbe()
    # bf16 rounds differently before and after folding: allow a few of the 270 predictions to move.
    # bf16 convolutions are slow on CPUs without native bf16: one batch each for validation, test and verification.
    callback = FuseOnExport(tolerance=0.02, max_verify_batches=1, export_formats=[])
    trainer = make_trainer(precision=precision, limit_val_batches=1, limit_test_batches=1, callbacks=[probe, callback])
    trainer.fit(model, datamodule=digits)
    assert callback.last_result.outcome is Outcome.FUSED
    expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in callback.fused["net"].parameters()} == {expected_dtype}
    trainer.test(model, datamodule=digits, verbose=False)
    assert probe.seen
    assert all(probe.seen)
    assert callback.last_result.stage == "test"
    assert callback.last_result.verification.passed
    assert not is_fused(model)


def test_fuse_on_export_exception_during_test_restores_original(
    trained: dict[str, Any], digits: Any, make_trainer: Any
) -> None:
    class Broken(DigitsCNN):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            assert runs_fused(self)
            raise ValueError("broken test_step")

    model = Broken.load_from_checkpoint(trained["best"])
    with pytest.raises(ValueError, match="broken test_step"):
        make_trainer(callbacks=[FuseOnExport(export_formats=[])]).test(model, datamodule=digits, verbose=False)
    assert_original(model, sample(digits))


def test_fuse_on_export_engine_error_warns_or_raises_when_strict(
    tiny_cnn: Any, digits: Any, make_trainer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fuse(*args: Any, **kwargs: Any) -> nn.Module:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr("fx_lightning.lightning.fusing.fuse", broken_fuse)
    model, callback = tiny_cnn(), FuseOnExport(export_formats=[])
    match = r"FuseOnExport failed at the end of fit on \['net'\], in fx_lightning.fuse: RuntimeError: engine exploded"
    with pytest.warns(UserWarning, match=match):
        make_trainer(callbacks=[callback]).fit(model, datamodule=digits)
    assert callback.last_result.outcome is Outcome.FAILED
    assert_original(model, sample(digits))

    with pytest.raises(RuntimeError, match=r"FuseOnExport\(strict=True\) failed at the end of fit on \['net'\], in fx"):
        make_trainer(callbacks=[FuseOnExport(strict=True, export_formats=[])]).fit(tiny_cnn(), datamodule=digits)


def test_fuse_on_export_verification_error_warns_and_keeps_original(
    tiny_cnn: Any, digits: Any, make_trainer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_update(*args: Any, **kwargs: Any) -> None:
        raise ValueError("outputs differ in shape")

    monkeypatch.setattr("fx_lightning.lightning.fusing.Verifier.update", broken_update)
    model, callback = tiny_cnn(), FuseOnExport(export_formats=[])
    with pytest.warns(UserWarning, match=r"on \['net'\], in the verification pass: ValueError: outputs differ"):
        make_trainer(callbacks=[callback]).fit(model, datamodule=digits)
    assert callback.last_result.outcome is Outcome.FAILED
    assert_original(model, sample(digits))


def test_fuse_on_export_validate_stage_only_when_asked(trained: dict[str, Any], digits: Any, make_trainer: Any) -> None:
    class ValProbe(pl.Callback):
        seen: list[bool] = []

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self.seen.append(runs_fused(pl_module))

    for stages, expected in ((["validate"], True), (["test"], False)):
        model, probe = DigitsCNN.load_from_checkpoint(trained["best"]), ValProbe()
        probe.seen = []
        make_trainer(callbacks=[probe, FuseOnExport(stages=stages, export_formats=[])]).validate(
            model, datamodule=digits, verbose=False
        )
        assert probe.seen
        assert all(s is expected for s in probe.seen)
        assert not is_fused(model)


def test_fuse_on_export_state_dict_round_trip(tiny_cnn: Any, digits: Any, make_trainer: Any) -> None:
    callback = FuseOnExport(export_formats=[])
    make_trainer(callbacks=[callback]).fit(tiny_cnn(), datamodule=digits)
    state = callback.state_dict()
    assert state["history"][0]["stage"] == "fit"
    assert state["history"][0]["outcome"] == "fused"
    json.dumps(state)  # plain data only
    other = FuseOnExport()
    other.load_state_dict(state)
    assert other.history == state["history"]


def test_fuse_on_export_progress_bar_shown_when_enabled(
    tiny_cnn: Any, digits: Any, make_trainer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    make_trainer(enable_progress_bar=True, callbacks=[FuseOnExport(export_formats=[])]).fit(
        tiny_cnn(), datamodule=digits
    )
    assert "FuseOnExport: verifying" in capsys.readouterr().err


def test_fuse_on_export_no_batch_norm_warns_and_does_nothing(digits: Any, make_trainer: Any) -> None:
    class NoBN(DigitsCNN):
        def __init__(self) -> None:
            super().__init__(width=4)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    model, callback = NoBN(), FuseOnExport(export_formats=[])
    with pytest.warns(
        UserWarning, match="found nothing to fuse at the end of fit: no BatchNorm in the children of NoBN"
    ):
        make_trainer(callbacks=[callback]).fit(model, datamodule=digits)
    assert not is_fused(model)
    assert callback.last_result.outcome is Outcome.NO_BATCH_NORM
    assert callback.fused == {}


def test_fuse_on_export_missing_or_wrong_attribute_raises(tiny_cnn: Any, make_trainer: Any) -> None:
    trainer, model = make_trainer(), tiny_cnn()
    with pytest.raises(ValueError, match=r"FuseOnExport\(attributes=\['backbone'\]\): DigitsCNN has no attribute"):
        FuseOnExport(attributes=["backbone"]).setup(trainer, model, "fit")
    model.not_a_module = 3
    with pytest.raises(TypeError, match=r"DigitsCNN.not_a_module is a int, expected a torch.nn.Module"):
        FuseOnExport(attributes=["not_a_module"]).setup(trainer, model, "fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_mismatch": "ignore"}, ValueError, r"FuseOnExport\(on_mismatch='ignore'\) expects one of"),
        ({"stages": ["train"]}, ValueError, r"FuseOnExport\(stages=\['train'\]\) expects a list drawn from"),
        ({"attributes": "net"}, ValueError, r"FuseOnExport\(attributes='net'\) expects a list of attribute names"),
        ({"metric": "accuracy"}, TypeError, r"FuseOnExport\(metric='accuracy'\) expects a torchmetrics Metric"),
        ({"tolerance": float("nan")}, ValueError, r"FuseOnExport\(tolerance=nan\) expects a number"),
        ({"tolerance": "1e-3"}, TypeError, r"FuseOnExport\(tolerance='1e-3'\) expects a number, got str"),
        ({"max_verify_batches": 0}, ValueError, r"FuseOnExport\(max_verify_batches=0\) expects a positive integer"),
        ({"export_formats": "pt2"}, ValueError, r"FuseOnExport\(export_formats='pt2'\) expects a list drawn from"),
        ({"export_formats": ["tflite"]}, ValueError, r"FuseOnExport\(export_formats=\['tflite'\]\) expects a list"),
        ({"attributes": [""]}, ValueError, r"FuseOnExport\(attributes=\[''\]\) expects a list of attribute names"),
        ({"export_stages": ["train"]}, ValueError, r"FuseOnExport\(export_stages=\['train'\]\) expects a list"),
    ],
)
def test_fuse_on_export_invalid_arguments_raise(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FuseOnExport(**kwargs)


def test_fuse_on_export_format_without_its_extra_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from fx_lightning.deploy.formats import registered_exporters

    def missing(options: Any) -> dict[str, Any]:
        raise MissingExtraError('needs onnxruntime: pip install "fx-lightning[onnx]".')

    exporters = registered_exporters()
    exporters["onnx"] = dataclasses.replace(exporters["onnx"], check=missing)
    monkeypatch.setattr("fx_lightning.lightning.options.registered_exporters", lambda: exporters)
    match = r"FuseOnExport\(export_formats=\['pt2', 'onnx'\]\) cannot write 'onnx' here: needs onnxruntime: pip install"
    with pytest.raises(MissingExtraError, match=match):
        FuseOnExport(export_formats=["pt2", "onnx"])


def test_fuse_on_export_rejects_spawn_and_sharded_strategies(tiny_cnn: Any) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spawn = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match=r"does not support spawn-based strategies \(Trainer\(strategy=DDPStrategy\)"):
        FuseOnExport().setup(spawn, tiny_cnn(), "fit")

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(ValueError, match=r"does not support Trainer\(strategy=FSDPStrategy\) yet"):
        FuseOnExport().setup(FakeTrainer(), tiny_cnn(), "fit")


def test_fuse_on_export_checkpoint_saved_inside_a_fused_loop_holds_the_users_values(
    trained: dict[str, Any], digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    class SaveDuringTest(pl.Callback):
        fused_then: bool = False

        def on_test_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any
        ) -> None:
            if batch_idx == 0:
                self.fused_then = runs_fused(pl_module)
                trainer.save_checkpoint(tmp_path / "during_test.ckpt")

    model = DigitsCNN.load_from_checkpoint(trained["best"])
    saver = SaveDuringTest()
    make_trainer(callbacks=[FuseOnExport(export_formats=[]), saver]).test(model, datamodule=digits, verbose=False)
    assert saver.fused_then
    saved = torch.load(tmp_path / "during_test.ckpt", weights_only=True)["state_dict"]
    assert list(saved) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key

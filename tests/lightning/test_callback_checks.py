"""FuseOnExport fails before training on what it can check, and never after: one error boundary, a report always."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fx_lightning import FuseOnExport
from fx_lightning.lightning.callback import Outcome


def conv_net(in_channels: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )


class Counted(pl.LightningModule):
    """Counts its training steps, so a test can tell that training never started."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()
        self.train_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.train_steps += 1
        x, y = self.split(batch)
        return F.cross_entropy(self(*x) if isinstance(x, tuple) else self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dict_loader(keys: tuple[str, str], n: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return DataLoader([{keys[0]: x[i], keys[1]: y[i]} for i in range(n)], batch_size=16)


def tuple_loader(n: int = 32, batch_size: int = 16, inputs: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 1, 8, 8, generator=gen) for _ in range(inputs)]
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(list(zip(*xs, y)), batch_size=batch_size)


def trainer(tmp_path: Path, callback: FuseOnExport) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )


class DictBatches(Counted):
    def __init__(self, keys: tuple[str, str]) -> None:
        super().__init__()
        self.keys = keys

    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        return batch[self.keys[0]], batch[self.keys[1]]


def test_fuse_on_export_hugging_face_dict_batches_work_by_default(tmp_path: Path) -> None:
    keys = ("pixel_values", "labels")
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["weights"])
    trainer(tmp_path, callback).fit(DictBatches(keys), dict_loader(keys), dict_loader(keys))
    result = callback.last_result
    assert result.outcome is Outcome.FUSED
    assert result.verification.num_samples == 32
    assert "MulticlassAccuracy" in result.verification.metric_original


def test_fuse_on_export_unknown_dict_keys_fail_before_training(tmp_path: Path) -> None:
    keys = ("img", "lbl")
    model = DictBatches(keys)
    match = (
        r"FuseOnExport\(get_input=None\) could not take the network input from the first val batch "
        r"\(a dict with keys \['img', 'lbl'\]\): default_get_input\(batch\) found none of the input keys"
    )
    with pytest.raises(TypeError, match=match):
        trainer(tmp_path, FuseOnExport()).fit(model, dict_loader(keys), dict_loader(keys))
    assert model.train_steps == 0


def test_fuse_on_export_target_layout_fails_before_training(tmp_path: Path) -> None:
    model = Counted()

    def get_target(batch: Any) -> torch.Tensor:
        return batch["y"]

    with pytest.raises(TypeError, match=r"FuseOnExport\(get_target=.*get_target\) could not take the target from"):
        trainer(tmp_path, FuseOnExport(get_target=get_target)).fit(model, tuple_loader(), tuple_loader())
    assert model.train_steps == 0


class TwoInputs(Counted):
    def __init__(self) -> None:
        super().__init__()
        self.other = conv_net()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a) + self.other(b)

    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        return (batch[0], batch[1]), batch[2]


def test_fuse_on_export_two_input_forward_fails_before_training_with_the_fix(tmp_path: Path) -> None:
    # (a, y) batches: binding the leading elements would leave no target, so the first element alone is tried.
    model = TwoInputs()
    match = (
        r"FuseOnExport: TwoInputs.forward\(a: 'torch.Tensor', b: 'torch.Tensor'\) -> 'torch.Tensor' cannot take the "
        r"input from the first val batch \(a list of 2\): get_input returned Tensor, passed as one argument "
        r"\(missing a required argument: 'b'\). Pass get_input=lambda batch: ..."
    )
    with pytest.raises(TypeError, match=match):
        trainer(tmp_path, FuseOnExport()).fit(model, tuple_loader(inputs=2), tuple_loader(inputs=1))
    assert model.train_steps == 0


def test_fuse_on_export_two_input_forward_fused_verified_exported(tmp_path: Path) -> None:
    callback = FuseOnExport(
        get_input=lambda batch: (batch[0], batch[1]),
        get_target=lambda batch: batch[2],
        export_dir=str(tmp_path / "out"),
    )
    trainer(tmp_path, callback).fit(TwoInputs(), tuple_loader(inputs=2), tuple_loader(inputs=2))
    result = callback.last_result
    assert result.attributes == ["net", "other"]
    assert result.outcome is Outcome.FUSED
    assert result.verification.passed
    assert set(result.artifacts) == {
        "net.pt2",
        "net.weights",
        "other.pt2",
        "other.weights",
        "ckpt",
    }


def test_fuse_on_export_batches_of_one_export_fixed_shapes_with_a_note(tmp_path: Path) -> None:
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["pt2"])
    trainer(tmp_path, callback).fit(Counted(), tuple_loader(), tuple_loader(batch_size=1))
    result = callback.last_result
    assert result.outcome is Outcome.FUSED
    assert set(result.artifacts) == {"pt2"}
    assert any("'net' exported with fixed input shapes: it receives batches of 1 here" in n for n in result.notes)


@pytest.mark.parametrize(
    ("kwargs", "patch", "outcome"),
    [
        ({}, None, "fused"),
        ({"tolerance": -1}, None, "reverted"),
        ({"tolerance": -1, "on_mismatch": "warn"}, None, "kept despite mismatch"),
        ({}, "fuse", "failed"),
        ({}, "data", "failed"),
        ({}, "capture", "failed"),
    ],
)
def test_fuse_on_export_report_written_for_every_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], patch: str | None, outcome: str
) -> None:
    import fx_lightning.lightning.fusing as fusing_module

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("broken after training")

    def data_gone_after_training(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("data gone after training")  # the check before training reads the data elsewhere

    if patch == "fuse":
        monkeypatch.setattr(fusing_module, "fuse", broken)
    elif patch == "data":
        monkeypatch.setattr(fusing_module, "verification_batches", data_gone_after_training)
    elif patch == "capture":
        monkeypatch.setattr(fusing_module, "capture_calls", broken)
    model = Counted()
    net = model.net
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=[], **kwargs)
    with pytest.warns(UserWarning, match="FuseOnExport") if outcome != "fused" else contextlib.nullcontext():
        trainer(tmp_path, callback).fit(model, tuple_loader(), tuple_loader())
    assert model.train_steps == 2  # training finished whatever failed afterwards
    assert model.net is net
    report = json.loads((tmp_path / "out" / "fuse_report.json").read_text())
    assert report["outcome"] == outcome
    assert callback.last_result.outcome.value == outcome
    if outcome == "failed":
        assert "broken after training" in report["error"] or "data gone after training" in report["error"]


def test_fuse_on_export_strict_failure_raises_after_writing_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr("fx_lightning.lightning.fusing.fuse", broken)
    model = Counted()
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), strict=True)
    match = r"FuseOnExport\(strict=True\) failed at the end of fit on \['net'\], in fx_lightning.fuse: RuntimeError"
    with pytest.raises(RuntimeError, match=match):
        trainer(tmp_path, callback).fit(model, tuple_loader(), tuple_loader())
    assert json.loads((tmp_path / "out" / "fuse_report.json").read_text())["outcome"] == "failed"


def test_fuse_on_export_unwritable_report_warns_and_keeps_the_run(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    callback = FuseOnExport(export_dir=str(blocker / "out"), export_formats=[])
    model = Counted()
    with pytest.warns(UserWarning, match=r"FuseOnExport could not write its report to .*a_file/out/fuse_report.json"):
        trainer(tmp_path, callback).fit(model, tuple_loader(), tuple_loader())
    assert model.train_steps == 2
    assert callback.last_result.outcome is Outcome.FUSED

"""deploy: the deploy checkpoint is a Lightning checkpoint of the user's class, reloaded and checked before use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from fx_lightning import FuseOnExport
from fx_lightning.examples.models import DigitsCNN
from fx_lightning.lightning.callback import Outcome
from fx_lightning.lightning.deploy_checkpoint import fresh_copy


class NoHyperparameters(DigitsCNN):
    """A LightningModule whose __init__ needs an argument it does not save: load_from_checkpoint cannot rebuild it."""

    def __init__(self, width: int) -> None:
        super().__init__(width=width)
        self._hparams_initial = None  # forget what DigitsCNN saved
        self._hparams = type(self.hparams)()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_deploy_checkpoint_without_hyperparameters_loads_into_a_copy(
    digits: Any, make_trainer: Any, tmp_path: Path
) -> None:
    pl.seed_everything(0, verbose=False)
    model = NoHyperparameters(width=4)
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["ckpt"])
    make_trainer(callbacks=[callback]).fit(model, datamodule=digits)
    result = callback.last_result
    assert result.outcome is Outcome.FUSED
    assert any("NoHyperparameters.load_from_checkpoint could not load the deploy checkpoint" in n for n in result.notes)
    assert any("self.save_hyperparameters()" in n for n in result.notes)
    state = torch.load(result.artifacts["ckpt"], weights_only=True)["state_dict"]
    loaded = NoHyperparameters(width=4)
    loaded.load_state_dict(state, strict=True)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), callback.fused["net"](x), rtol=1e-4, atol=1e-5)


def test_deploy_checkpoint_that_computes_something_else_is_not_announced(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong_values(original: nn.Module, fused: nn.Module) -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(v) for k, v in original.state_dict().items()}

    monkeypatch.setattr("fx_lightning.lightning.deploy_checkpoint.checkpoint_state_dict", wrong_values)
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["ckpt", "weights"])
    # the checkpoint gets its own verdict, and the export goes on: the weights are written, verified, announced
    with pytest.warns(UserWarning, match=r"the 'ckpt' artifact .*deploy.ckpt .*failed verification over"):
        make_trainer(callbacks=[callback]).fit(tiny_cnn(), datamodule=digits)
    result = callback.last_result
    assert result.outcome is Outcome.FUSED  # the fusion itself is fine
    assert set(result.artifacts) == {"weights"}
    entry = result.deploy["artifacts"]["ckpt"]
    assert entry["verification"]["passed"] is False
    assert entry["path"].endswith("deploy.FAILED.ckpt")
    assert any("differs from the fused network on its example input" in note for note in entry["notes"])
    assert result.deploy["artifacts"]["weights"]["verification"]["passed"] is True

    strict = FuseOnExport(export_dir=str(tmp_path / "strict"), export_formats=["ckpt"], strict=True)
    with pytest.raises(
        RuntimeError, match=r"FuseOnExport\(strict=True\) could not export the fused network at the end"
    ):
        make_trainer(callbacks=[strict]).fit(tiny_cnn(), datamodule=digits)
    assert (tmp_path / "strict" / "fuse_report.json").is_file()


def test_fresh_copy_leaves_the_trainer_behind(tiny_cnn: Any, make_trainer: Any) -> None:
    model = tiny_cnn()
    trainer = make_trainer()
    model.trainer = trainer
    copied = fresh_copy(model)
    assert copied._trainer is None
    assert model._trainer is trainer
    assert copied.net is not model.net
    assert torch.equal(copied.net[0][0].weight, model.net[0][0].weight)

"""FuseOnExport respects the user's run: batch limits, random state, MC-dropout, frozen BatchNorms, one-shot data."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fx_lightning import FuseOnExport
from fx_lightning.examples.models import DigitsCNN
from fx_lightning.lightning.callback import Outcome


@pytest.mark.parametrize(("limit", "samples"), [(1, 128), (0.67, 256), (1.0, 270)])
def test_fuse_on_export_verification_honours_limit_val_batches(
    tiny_cnn: Any, digits: Any, make_trainer: Any, limit: float, samples: int
) -> None:
    callback = FuseOnExport(export_formats=[])
    trainer = make_trainer(limit_val_batches=limit, callbacks=[callback])
    trainer.fit(tiny_cnn(), datamodule=digits)
    assert callback.last_result.verification.num_samples == samples
    assert callback.last_result.verify_source.startswith("val")
    # Before test, the validation data with the same limit.
    trainer.test(trainer.lightning_module, datamodule=digits, verbose=False)
    assert callback.last_result.stage == "test"
    assert callback.last_result.verification.num_samples == samples


def draws() -> tuple[torch.Tensor, np.ndarray, float]:
    return torch.rand(3), np.random.rand(3), random.random()


def test_fuse_on_export_leaves_the_random_state_as_found(tiny_cnn: Any, digits: Any, make_trainer: Any) -> None:
    after: list[tuple[Any, ...]] = []
    for callbacks in ([FuseOnExport(export_formats=[])], []):
        model = tiny_cnn()
        trainer = make_trainer(callbacks=callbacks)
        pl.seed_everything(3, verbose=False)
        trainer.fit(model, datamodule=digits)
        fit_draws = draws()
        trainer.test(model, datamodule=digits, verbose=False)
        after.append((*fit_draws, *draws()))
    with_callback, without = after
    for a, b in zip(with_callback, without):
        assert np.array_equal(np.asarray(a), np.asarray(b))


class MCDropout(DigitsCNN):
    """Monte-Carlo dropout: predict_step switches the Dropout layers to training mode and samples twice."""

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.train()
        x = batch[0]
        return {
            "samples": (self(x), self(x)),
            "batch_norms": sum(isinstance(m, nn.BatchNorm2d) for m in self.net.modules()),
        }


def test_fuse_on_export_mc_dropout_prediction_keeps_its_spread(digits: Any, make_trainer: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = MCDropout(width=4, dropout=0.5).eval()
    predictions = make_trainer(limit_predict_batches=1, callbacks=[FuseOnExport(export_formats=[])]).predict(
        model, datamodule=digits
    )
    (prediction,) = predictions
    assert prediction["batch_norms"] == 0  # the fused network ran
    first, second = prediction["samples"]
    assert not torch.allclose(first, second)  # dropout still samples
    # The user's own Dropout layers were not switched by the fused run's predict_step.
    assert not any(m.training for m in model.modules())


class FrozenNet(DigitsCNN):
    """A network with torchvision's FrozenBatchNorm2d, which computes without a batch_norm kernel."""

    def __init__(self) -> None:
        super().__init__(width=4)
        frozen = FrozenBatchNorm2d(4)
        frozen.running_mean.uniform_(-0.1, 0.1)
        frozen.running_var.uniform_(0.5, 1.5)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            frozen,
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.Flatten(),
            nn.Linear(256, 10),
        )


def test_fuse_on_export_counts_frozen_batch_norms(digits: Any, make_trainer: Any) -> None:
    pl.seed_everything(0, verbose=False)
    callback = FuseOnExport(export_formats=[])
    make_trainer(callbacks=[callback]).fit(FrozenNet(), datamodule=digits)
    result = callback.last_result
    assert result.outcome is Outcome.FUSED
    assert result.num_folded == 2
    assert (result.kernels_before, result.kernels_after) == (2, 0)
    assert "BatchNorm kernels per forward: 2 -> 0 (2 removed)" in str(result)


def test_fuse_on_export_one_shot_verify_dataloader_loses_nothing(tiny_cnn: Any, digits: Any, make_trainer: Any) -> None:
    digits.setup("fit")
    batches = list(digits.val_dataloader())
    callback = FuseOnExport(verify_dataloader=(batch for batch in batches), export_formats=[])
    trainer, model = make_trainer(callbacks=[callback]), tiny_cnn()
    trainer.fit(model, datamodule=digits)
    assert callback.last_result.verify_source == "given"
    assert callback.last_result.verification.num_samples == 270
    trainer.test(model, datamodule=digits, verbose=False)
    assert callback.last_result.verification.num_samples == 270


def test_fuse_on_export_reports_its_seconds_beside_the_validation_epoch(
    tiny_cnn: Any, digits: Any, make_trainer: Any
) -> None:
    callback = FuseOnExport(export_formats=["weights"])
    trainer = make_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(tiny_cnn(), datamodule=digits)
    result = callback.last_result
    assert result.validation_epoch_seconds is not None
    assert result.validation_epoch_seconds > 0
    assert set(result.seconds) >= {"fuse", "verify", "export"}
    total = sum(result.seconds.values())
    assert f"{total / result.validation_epoch_seconds:.1f}x the last validation epoch" in str(result)
    assert result.to_dict()["validation_epoch_seconds"] == result.validation_epoch_seconds
    # A stage other than fit has no validation epoch of its own to stand beside.
    trainer.test(trainer.lightning_module, datamodule=digits, verbose=False)
    assert callback.last_result.validation_epoch_seconds is None
    assert "x the last validation epoch" not in str(callback.last_result)


def test_fuse_on_export_two_instances_keep_their_own_checkpoint_state(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Any
) -> None:
    first = FuseOnExport(attributes=["net"], export_formats=[], export_dir=str(tmp_path / "a"))
    second = FuseOnExport(attributes=["net"], export_formats=["weights"], export_dir=str(tmp_path / "b"))
    assert first.state_key != second.state_key
    assert first.state_key.startswith("FuseOnExport{")
    trainer = make_trainer(callbacks=[first, second])
    trainer.fit(tiny_cnn(), datamodule=digits)  # two instances with one state key would be refused here
    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    assert states[first.state_key]["history"] == first.history
    assert states[second.state_key]["history"] == second.history
    assert first.history
    assert second.history


def test_fuse_on_export_state_under_the_old_key_still_resumes(
    tiny_cnn: Any, digits: Any, make_trainer: Any, tmp_path: Any
) -> None:
    callback = FuseOnExport(export_formats=[])
    trainer = make_trainer(callbacks=[callback])
    trainer.fit(tiny_cnn(), datamodule=digits)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    # A checkpoint written before the state key named its options keeps the state under the class name.
    checkpoint["callbacks"] = {"FuseOnExport": checkpoint["callbacks"].pop(callback.state_key)}
    torch.save(checkpoint, path)
    resumed = FuseOnExport(export_formats=[])
    make_trainer(max_epochs=2, callbacks=[resumed]).fit(tiny_cnn(), datamodule=digits, ckpt_path=str(path))
    assert [entry["stage"] for entry in resumed.history][: len(callback.history)] == [
        entry["stage"] for entry in callback.history
    ]
    assert len(resumed.history) == len(callback.history) + 1

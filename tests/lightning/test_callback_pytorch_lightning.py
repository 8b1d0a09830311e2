"""FuseOnExport with the standalone ``pytorch_lightning`` package: its Trainer accepts the same class."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl  # noqa: E402
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fx_lightning import FuseOnExport, count_kernels
from fx_lightning.lightning.callback import is_fused


class PLNet(pl.LightningModule):
    """A Conv-BN classifier written against ``pytorch_lightning``, as older user code is."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
        )
        self.fused_during_test: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.fused_during_test.append(not any(isinstance(m, nn.BatchNorm2d) for m in self.net.modules()))
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    return DataLoader(data, batch_size=32)


def test_fuse_on_export_accepted_by_pytorch_lightning_trainer(tmp_path: Any) -> None:
    callback = FuseOnExport(export_formats=[])
    assert isinstance(callback, pl.Callback)
    pl.seed_everything(0, verbose=False)
    model = PLNet()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    net = model.net
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    assert not is_fused(model)
    assert model.net is net
    assert callback.last_result.outcome == "fused"
    assert count_kernels(callback.fused["net"], torch.zeros(2, 1, 8, 8)) == 0
    assert callback.last_result.verification.passed

    trainer.test(model, dataloaders=loader(), verbose=False)
    assert model.fused_during_test
    assert all(model.fused_during_test)
    assert not is_fused(model)
    assert model.net is net
    assert count_kernels(model.net.eval(), torch.zeros(2, 1, 8, 8)) == 1

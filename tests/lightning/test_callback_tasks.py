"""FuseOnExport on other tasks than classification: regression, segmentation, detection with list inputs and
list-of-dict outputs. The default metric is chosen from outputs and targets; when none fits, the outputs are
compared and the summary says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fx_lightning import FuseOnExport
from fx_lightning.lightning.callback import Outcome


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


def features(channels: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())


class Task(pl.LightningModule):
    def __init__(self, head: nn.Module, loss: Any) -> None:
        super().__init__()
        self.body = features()
        self.head = head
        self.loss = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def pairs(targets: torch.Tensor, n: int = 32) -> DataLoader:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(list(zip(x, targets)), batch_size=16)


def test_fuse_on_export_regression_verified_with_mean_squared_error(tmp_path: Path) -> None:
    model = Task(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), F.mse_loss)
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["pt2"])
    data = pairs(torch.randn(32, 2))
    trainer(tmp_path, callback).fit(model, data, data)
    result = callback.last_result
    assert result.outcome is Outcome.FUSED
    assert list(result.verification.metric_original) == ["MeanSquaredError"]
    assert result.verification.passed


def test_fuse_on_export_segmentation_verified_with_jaccard_index(tmp_path: Path) -> None:
    model = Task(nn.Conv2d(4, 3, 1), F.cross_entropy)
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["pt2"])
    data = pairs(torch.randint(0, 3, (32, 8, 8)))
    trainer(tmp_path, callback).fit(model, data, data)
    result = callback.last_result
    assert result.outcome is Outcome.FUSED
    assert list(result.verification.metric_original) == ["MulticlassJaccardIndex"]
    assert result.verification.passed


class ToyDetector(pl.LightningModule):
    """Takes a list of images of different sizes and returns one dict of boxes/scores/labels per image, as
    torchvision's detectors do in eval mode; trained on ``(images, targets)`` from the reference collate."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = features(6)
        self.box = nn.Linear(6, 4)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            pooled = self.backbone(image[None]).mean(dim=(2, 3))
            out.append({"boxes": self.box(pooled).abs(), "scores": pooled[:, 0].sigmoid(), "labels": pooled.argmax(1)})
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        predictions = self(images)
        return sum(F.l1_loss(p["boxes"], t["boxes"]) for p, t in zip(predictions, targets))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def detection_loader(n: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    samples = [
        (
            torch.randn(3, 8 + i % 3, 8, generator=gen),
            {"boxes": torch.rand(1, 4, generator=gen), "labels": torch.ones(1)},
        )
        for i in range(n)
    ]
    return DataLoader(samples, batch_size=4, collate_fn=lambda batch: tuple(zip(*batch)))


def test_fuse_on_export_detection_list_inputs_and_outputs_fused_verified_exported(tmp_path: Path) -> None:
    model = ToyDetector()
    callback = FuseOnExport(export_dir=str(tmp_path / "out"))
    trainer(tmp_path, callback).fit(model, detection_loader(), detection_loader())
    result = callback.last_result
    assert result.attributes == ["backbone"]
    assert result.outcome is Outcome.FUSED
    assert result.verification.passed
    assert result.verification.num_samples == 8  # images, not their channels
    assert result.verification.max_abs_diff < 1e-5
    assert any("no default metric fits outputs a list of 4 of a dict" in n for n in result.verification.notes)
    assert set(result.artifacts) == {"pt2", "weights", "ckpt"}
    # the backbone sees one image at a time: exported with fixed shapes, and the summary says why
    assert any("'backbone' exported with fixed input shapes: it receives batches of 1" in n for n in result.notes)
    image = torch.randn(3, 8, 8)
    program = torch.export.load(result.artifacts["pt2"]).module()
    with torch.no_grad():
        torch.testing.assert_close(program(image[None]), callback.fused["backbone"](image[None]))

"""FuseOnExport on a torchvision detector end to end: Faster R-CNN (MobileNetV3 backbone) trained on the reference
``tuple(zip(*batch))`` collate, verified with MeanAveragePrecision, its deploy artifacts written and reloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fx_lightning import FuseOnExport
from fx_lightning.lightning.callback import Outcome

pytest.importorskip("pycocotools")
detection = pytest.importorskip("torchvision.models.detection")
from torchmetrics.detection import MeanAveragePrecision  # noqa: E402 - after the skip: needs pycocotools


class Detector(pl.LightningModule):
    """The usual Lightning wrapping of a torchvision detector: losses in training, detections in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=96
        )

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(list(images))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        return sum(self.model(list(images), list(targets)).values())

    def validation_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self(batch[0])

    def test_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self(batch[0])

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def boxes_loader(n: int = 4, size: int = 96) -> DataLoader:
    """``n`` seeded images with one or two boxes each, in batches of two, collated as torchvision's references do."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        count = 1 + i % 2
        corner = torch.randint(0, size // 2, (count, 2), generator=gen).float()
        extent = torch.randint(16, size // 2, (count, 2), generator=gen).float()
        target = {
            "boxes": torch.cat([corner, corner + extent], 1),
            "labels": torch.randint(1, 3, (count,), generator=gen),
        }
        samples.append((torch.rand(3, size, size, generator=gen), target))
    return DataLoader(samples, batch_size=2, collate_fn=lambda batch: tuple(zip(*batch)))


@pytest.mark.slow  # about three minutes on two CPU cores, most of it torch.export of the FPN backbone
def test_fuse_on_export_faster_rcnn_verified_with_mean_average_precision(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = Detector()
    network = model.model
    # The backbone (MobileNetV3 + FPN) holds every BatchNorm and takes one batched tensor; the detector around it
    # (transform, RPN, RoI heads) branches on tensor values and is verified through the LightningModule's forward.
    callback = FuseOnExport(
        attributes=["model.backbone"],
        metric=MeanAveragePrecision(),
        export_dir=str(tmp_path / "out"),
        export_formats=["pt2", "ckpt"],
        deploy_latency_budget=0,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, boxes_loader(), boxes_loader())
    # The user's detector is still in place, untouched in class and layout.
    assert model.model is network
    assert type(network.backbone).__name__ == "BackboneWithFPN"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) == 46
    result = callback.last_result
    assert result.outcome is Outcome.FUSED
    assert result.attributes == ["model.backbone"]
    assert result.num_folded == 46
    assert (result.kernels_before, result.kernels_after) == (46, 0)
    v = result.verification
    assert v.passed
    assert v.num_samples == 4  # images, not their channels
    assert v.metric_original["MeanAveragePrecision.map"] == pytest.approx(
        v.metric_fused["MeanAveragePrecision.map"], abs=1e-3
    )
    # The backbone takes the batched tensor made inside the detector: its artifacts stand in for it there, and are
    # verified with the metric through the LightningModule's forward.
    assert any(
        "'model.backbone' artifacts verified with the metric through Detector.forward" in n for n in result.notes
    )
    assert set(result.artifacts) == {"pt2", "ckpt"}
    fused_backbone = callback.fused["model.backbone"]
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected = network.eval().backbone(x)
        program = torch.export.load(result.artifacts["pt2"]).module()
        for name, value in program(x).items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fused_backbone(x)[name], expected[name], rtol=1e-4, atol=1e-4)
        deployed = Detector.load_from_checkpoint(result.artifacts["ckpt"], strict=True).eval()
        images = [torch.rand(3, 96, 96)]
        torch.testing.assert_close(
            deployed(images)[0]["scores"], model.eval()(images)[0]["scores"], rtol=1e-3, atol=1e-4
        )

    predictions = trainer.predict(model, boxes_loader())
    assert len(predictions) == 2
    assert set(predictions[0][0]) == {"boxes", "scores", "labels"}
    assert callback.last_result.stage == "predict"
    assert callback.last_result.outcome is Outcome.FUSED
    assert model.model is network
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) == 46  # put back after predict

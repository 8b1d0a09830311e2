"""FuseOnExport on an ultralytics YOLO detector (built from its yaml, no download) trained with its own loss: fused at
the end of fit, verified on its outputs relative to their scale, its artifacts written and verified.

ultralytics is AGPL-3.0: a test-only extra, never imported by the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from fx_lightning import FuseOnExport
from fx_lightning.lightning.callback import Outcome

IMGSZ = 64


class Yolo(pl.LightningModule):
    """The usual wrapping of an ultralytics detection model: its own loss in training, raw predictions in eval."""

    def __init__(self) -> None:
        super().__init__()
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel

        self.model = DetectionModel("yolo11n.yaml", nc=2, verbose=False)
        self.model.args = get_cfg()  # the loss's hyper-parameters (box, cls, dfl gains)

    def forward(self, images: Tensor) -> Any:
        return self.model(images)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self.model.loss(batch)
        return loss.sum()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.001)


def yolo_batches(n: int = 2, batch_size: int = 2) -> list[dict[str, Tensor]]:
    """Synthetic batches in ultralytics' layout: images, and per box its image index, class and normalised xywh."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        boxes = torch.rand(batch_size, 4, generator=gen) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1])
        batches.append(
            {
                "img": torch.rand(batch_size, 3, IMGSZ, IMGSZ, generator=gen),
                "cls": torch.randint(0, 2, (batch_size, 1), generator=gen).float(),
                "bboxes": boxes,
                "batch_idx": torch.arange(batch_size).float(),
            }
        )
    return batches


@pytest.mark.slow  # about 20 s on two idle cores (minutes on busy ones), most of it the ONNX export
def test_fuse_on_export_ultralytics_yolo_trained_with_its_own_loss(tmp_path: Path, make_trainer: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model = Yolo()
    train = DataLoader(yolo_batches(), batch_size=None)
    val = DataLoader([b["img"] for b in yolo_batches()], batch_size=None)  # images only: outputs compared
    callback = FuseOnExport(
        attributes=["model"],
        export_dir=str(tmp_path / "out"),
        export_formats=["onnx", "weights", "ckpt"],
        deploy_latency_budget=0,
    )
    trainer = make_trainer(limit_train_batches=1, callbacks=[callback])
    trainer.fit(model, train, val)
    result = callback.last_result
    assert result.outcome is Outcome.FUSED, str(result)
    assert result.num_folded > 0
    v = result.verification
    assert v.passed
    assert v.metric_original == {}  # no targets: outputs only, relative to each output's scale
    assert v.max_rel_diff <= v.tolerance
    assert v.num_samples == 4
    assert set(result.artifacts) == {"onnx", "weights", "ckpt"}, result.deploy
    for fmt, entry in result.deploy["artifacts"].items():
        assert entry["verification"]["passed"] is True, fmt
        assert entry["verification"]["max_rel_diff"] <= 1e-3, fmt

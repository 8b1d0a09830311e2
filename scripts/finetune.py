"""Fine-tune torchvision's ResNet-18 on the packaged digits (resized to 32x32 RGB), then fuse, verify and export it.

    python scripts/finetune.py                                  # random initial weights, nothing downloaded
    python scripts/finetune.py --weights resnet18.pth --freeze-backbone --epochs 3

``--weights`` takes a local ResNet-18 state dict (e.g. ImageNet weights saved once with
``torch.save(torchvision.models.resnet18(weights="DEFAULT").state_dict(), "resnet18.pth")``).
The test after training runs with the best checkpoint's weights, fused; the artifacts and
``fuse_report.json`` land in ``<out>/fused``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.classification import MulticlassAccuracy

from fx_lightning import FuseOnExport
from fx_lightning.examples.data import DigitsDataModule
from fx_lightning.examples.models import ResNetClassifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv=None`` reads ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="local ResNet-18 state dict to start from")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the final layer")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="train on at most this many batches")
    parser.add_argument(
        "--limit-eval-batches", type=int, default=None, help="validate and test on at most this many batches"
    )
    parser.add_argument("--max-verify-batches", type=int, default=4, help="validation batches used to verify")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--export-formats",
        nargs="*",
        default=["pt2", "weights", "ckpt"],
        help="any of pt2, weights, ckpt (the deploy checkpoint), onnx (needs [onnx])",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> FuseOnExport:
    """Fine-tune, test fused, export; return the callback (its ``last_result`` holds the figures)."""
    args = parse_args(argv)
    pl.seed_everything(args.seed)
    model = ResNetClassifier(
        num_classes=10,
        lr=args.lr,
        weights_path=str(args.weights) if args.weights else None,
        freeze_backbone=args.freeze_backbone,
    )
    data = DigitsDataModule(batch_size=args.batch_size, image_size=32, channels=3, seed=args.seed)
    fuse = FuseOnExport(
        metric=MulticlassAccuracy(num_classes=10),
        max_verify_batches=args.max_verify_batches,
        export_dir=str(args.out / "fused"),
        export_formats=args.export_formats,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_eval_batches,
        limit_test_batches=args.limit_eval_batches,
        default_root_dir=args.out,
        logger=CSVLogger(args.out, name="logs"),
        callbacks=[ModelCheckpoint(monitor="val_acc", mode="max"), fuse],
        log_every_n_steps=5,
    )
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, ckpt_path="best")
    return fuse


if __name__ == "__main__":
    main()

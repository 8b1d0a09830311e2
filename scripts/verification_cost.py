"""Measure what FuseOnExport's work costs next to one validation epoch, on the digits CNN and ResNet-18.

    python scripts/verification_cost.py --repeats 3

For each model: the median time of ``trainer.validate`` (one validation epoch, no callback), and of the
callback's fuse, verify and export steps when it runs before ``trainer.validate`` on the same data
(``stages=["validate"]``). The verification pass runs the validation data through the original and the
fused network in one pass, so its cost should be about one validation epoch of forwards.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from fx_lightning import FuseOnExport
from fx_lightning.examples.data import DigitsDataModule
from fx_lightning.examples.models import DigitsCNN, ResNetClassifier


def _trainer(callbacks: list[Any], root: str) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        callbacks=callbacks,
    )


def measure(model: LightningModule, data: LightningDataModule, repeats: int, formats: list[str]) -> dict[str, float]:
    """Median seconds of one plain validation epoch and of each step of the callback."""
    plain, steps = [], []
    with tempfile.TemporaryDirectory() as root:
        for _ in range(repeats):
            start = time.perf_counter()
            _trainer([], root).validate(model, datamodule=data, verbose=False)
            plain.append(time.perf_counter() - start)
            callback = FuseOnExport(stages=["validate"], export_formats=formats, export_stages=["validate"])
            _trainer([callback], root).validate(model, datamodule=data, verbose=False)
            assert callback.last_result is not None
            steps.append(callback.last_result.seconds)
    result = {"validation epoch": statistics.median(plain)}
    for key in steps[0]:
        result[key] = statistics.median(s[key] for s in steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per model; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--export", nargs="*", default=["pt2", "weights"], help="export formats to time")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected a positive number of runs")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "DigitsCNN, digits 8x8": (DigitsCNN(), DigitsDataModule()),
        "ResNet-18, digits 32x32x3": (ResNetClassifier(), DigitsDataModule(image_size=32, channels=3)),
    }
    print("| model | one validation epoch (s) | fuse (s) | verify (s) | verify / epoch | export (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (model, data) in cases.items():
        t = measure(model, data, args.repeats, args.export)
        epoch, verify = t["validation epoch"], t.get("verify", float("nan"))
        print(
            f"| {name} | {epoch:.2f} | {t.get('fuse', float('nan')):.2f} | {verify:.2f} | {verify / epoch:.2f} "
            f"| {t.get('export', float('nan')):.2f} |"
        )


if __name__ == "__main__":
    main()

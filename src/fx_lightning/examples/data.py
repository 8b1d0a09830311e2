"""The digits data set shipped with the package, and a LightningDataModule over it.

The file is scikit-learn's 8x8 handwritten digits (1797 images, UCI ML hand-written digits), stored as
``digits.csv.gz`` beside this module, so examples and tests train on real data without a download.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import math

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

_DATA_FILE = "digits.csv.gz"
_NUM_PIXELS = 64
_MAX_PIXEL = 16.0


def load_digits() -> tuple[Tensor, Tensor]:
    """Load the 1797 digit images shipped with the package.

    Returns:
        ``(images, labels)``: images as float32 ``(N, 1, 8, 8)`` scaled to ``[0, 1]``, labels as int64 ``(N,)``
        with values ``0..9``.

    Example:
        >>> images, labels = load_digits()
        >>> tuple(images.shape), tuple(labels.shape), labels.dtype
        ((1797, 1, 8, 8), (1797,), torch.int64)
    """
    raw = importlib.resources.files("fx_lightning.examples").joinpath(_DATA_FILE).read_bytes()
    text = gzip.decompress(raw).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != _NUM_PIXELS + 1:
        raise RuntimeError(
            f"load_digits() read {table.shape[1]} columns from {_DATA_FILE}, expected {_NUM_PIXELS + 1} "
            "(64 pixels then the label). The packaged file is damaged; reinstall fx-lightning."
        )
    images = torch.from_numpy(table[:, :_NUM_PIXELS]).to(torch.float32).div_(_MAX_PIXEL).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(table[:, _NUM_PIXELS].copy())
    return images, labels


class DigitsDataModule(pl.LightningDataModule):
    """Train/val/test splits of the packaged digits, resized and standardised on the training split.

    Batches are ``(x, y)`` tuples: ``x`` float32 ``(B, channels, image_size, image_size)``, ``y`` int64 ``(B,)``.
    The predict dataloader serves the test split, also as ``(x, y)``.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((32, 1, 8, 8), (32,))
    """

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 8,
        channels: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """Configure the splits and the preprocessing.

        Args:
            batch_size: samples per batch, at least 1.
            image_size: side of the square images served; 8 keeps the original pixels, a larger value
                (e.g. 32 for ResNet-18) resizes with bilinear interpolation.
            channels: 1 for grey images, or 3 to repeat the grey channel for RGB networks.
            val_fraction: share of the images held out for validation, in ``[0, 1)``.
            test_fraction: share held out for testing, in ``[0, 1)``; with ``val_fraction`` below 1.
            num_workers: DataLoader worker processes; 0 loads in the main process.
            seed: seed of the random permutation that assigns images to splits.

        Raises:
            ValueError: if an argument is out of its range.
        """
        super().__init__()
        _check_arguments(batch_size, image_size, channels, val_fraction, test_fraction, num_workers)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.mean: float | None = None
        self.std: float | None = None

    @property
    def num_classes(self) -> int:
        """The number of digit classes, 10."""
        return 10

    def setup(self, stage: str | None = None) -> None:
        """Split, resize and standardise once; every stage gets the same splits."""
        if self.train_set is not None:
            return
        images, labels = load_digits()
        images = self._resize(images)
        n = images.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = round(n * self.val_fraction)
        n_test = round(n * self.test_fraction)
        test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        # Statistics come from the training split only, so validation and test stay unseen.
        train_images = images[train_idx]
        self.mean = float(train_images.mean())
        self.std = float(train_images.std().clamp_min(1e-6))
        standardised = (images - self.mean) / self.std
        self.train_set = TensorDataset(standardised[train_idx], labels[train_idx])
        self.val_set = TensorDataset(standardised[val_idx], labels[val_idx])
        self.test_set = TensorDataset(standardised[test_idx], labels[test_idx])

    def _resize(self, images: Tensor) -> Tensor:
        if self.image_size != 8:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if self.channels == 3:
            images = images.repeat(1, 3, 1, 1)
        return images.contiguous()

    def _loader(self, dataset: TensorDataset | None, split: str, *, shuffle: bool, caller: str = "") -> DataLoader:
        caller = caller or split
        if dataset is None:
            raise RuntimeError(
                f"DigitsDataModule.{caller}_dataloader() was called before setup(). "
                "Call dm.setup('fit') first, or let the Trainer call it."
            )
        if len(dataset) == 0:
            raise RuntimeError(
                f"DigitsDataModule.{caller}_dataloader(): the {split} split is empty "
                f"(val_fraction={self.val_fraction}, test_fraction={self.test_fraction}). "
                f"Give the {split} split a fraction above 0."
            )
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The training split, reshuffled every epoch from a generator seeded with ``seed``."""
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split, in a fixed order."""
        return self._loader(self.val_set, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, in a fixed order."""
        return self._loader(self.test_set, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split again, as ``(x, y)`` batches, for ``Trainer.predict``."""
        return self._loader(self.test_set, "test", shuffle=False, caller="predict")


def _check_arguments(
    batch_size: int, image_size: int, channels: int, val_fraction: float, test_fraction: float, num_workers: int
) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"DigitsDataModule(batch_size={batch_size!r}) expects a positive integer, e.g. batch_size=64.")
    if not is_int(image_size) or image_size < 8:
        raise ValueError(
            f"DigitsDataModule(image_size={image_size!r}) expects an integer >= 8 (the images are 8x8; larger "
            "sizes are upsampled), e.g. image_size=32 for ResNet-18."
        )
    if channels not in (1, 3):
        raise ValueError(f"DigitsDataModule(channels={channels!r}) expects 1 (grey) or 3 (grey repeated as RGB).")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not (0 <= value < 1)
        ):
            raise ValueError(f"DigitsDataModule({name}={value!r}) expects a fraction in [0, 1), e.g. {name}=0.15.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"DigitsDataModule(val_fraction={val_fraction}, test_fraction={test_fraction}) leaves no training data: "
            "their sum must be below 1, e.g. 0.15 each."
        )
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"DigitsDataModule(num_workers={num_workers!r}) expects an integer >= 0.")

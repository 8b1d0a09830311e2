"""The packaged digits data and its DataModule: shapes, ranges, deterministic splits, preprocessing, errors."""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import pytest
import torch

from fx_lightning.examples.data import DigitsDataModule, load_digits


def test_load_digits_shapes_ranges_and_labels() -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.shape == (1797,)
    assert labels.dtype == torch.int64
    assert float(images.min()) == 0.0
    assert float(images.max()) == 1.0
    counts = torch.bincount(labels, minlength=10)
    assert counts.numel() == 10
    assert int(counts.min()) >= 170  # every class is present, roughly balanced


def test_load_digits_matches_raw_file() -> None:
    raw = importlib.resources.files("fx_lightning.examples").joinpath("digits.csv.gz").read_bytes()
    first = [int(v) for v in gzip.decompress(raw).decode().splitlines()[0].split(",")]
    images, labels = load_digits()
    expected = torch.tensor(first[:64], dtype=torch.float32).reshape(1, 8, 8) / 16
    torch.testing.assert_close(images[0], expected, rtol=0, atol=0)
    assert int(labels[0]) == first[64]


def test_digits_datamodule_splits_are_disjoint_and_deterministic() -> None:
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.1, seed=3)
    dm.setup("fit")
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (1797 - 359 - 180, 359, 180)
    again = DigitsDataModule(val_fraction=0.2, test_fraction=0.1, seed=3)
    again.setup("test")
    torch.testing.assert_close(dm.val_set.tensors[0], again.val_set.tensors[0], rtol=0, atol=0)
    other = DigitsDataModule(val_fraction=0.2, test_fraction=0.1, seed=4)
    other.setup("fit")
    assert not torch.equal(dm.val_set.tensors[1], other.val_set.tensors[1])
    # disjoint: together the splits hold each image exactly once
    all_x = torch.cat([s.tensors[0] for s in (dm.train_set, dm.val_set, dm.test_set)]).flatten(1)
    assert torch.unique(all_x, dim=0).shape[0] == torch.unique(load_digits()[0].flatten(1), dim=0).shape[0]


def test_digits_datamodule_standardises_with_training_statistics() -> None:
    dm = DigitsDataModule()
    dm.setup("fit")
    train_x = dm.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4
    assert abs(float(train_x.std()) - 1.0) < 1e-3
    assert dm.mean is not None
    assert dm.std is not None
    # the stored statistics undo the standardisation back to [0, 1] pixels
    restored = dm.val_set.tensors[0] * dm.std + dm.mean
    assert float(restored.min()) > -1e-5
    assert float(restored.max()) < 1 + 1e-5


def test_digits_datamodule_resizes_and_repeats_channels() -> None:
    dm = DigitsDataModule(batch_size=16, image_size=32, channels=3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    assert y.shape == (16,)
    torch.testing.assert_close(x[:, 0], x[:, 2], rtol=0, atol=0)
    assert dm.hparams["image_size"] == 32
    assert dm.num_classes == 10


def test_digits_datamodule_dataloaders_yield_tuples() -> None:
    dm = DigitsDataModule(batch_size=50)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, (tuple, list))
        assert len(batch) == 2
        assert batch[0].shape == (50, 1, 8, 8)
    # the training loader reshuffles per epoch but is seeded: two fresh loaders give the same first batch
    torch.testing.assert_close(
        next(iter(dm.train_dataloader()))[1], next(iter(dm.train_dataloader()))[1], rtol=0, atol=0
    )
    assert sum(len(b[1]) for b in dm.val_dataloader()) == len(dm.val_set)


def test_digits_datamodule_dataloader_before_setup_raises() -> None:
    dm = DigitsDataModule()
    with pytest.raises(RuntimeError, match=r"train_dataloader\(\) was called before setup\(\)"):
        dm.train_dataloader()


def test_digits_datamodule_empty_split_raises() -> None:
    dm = DigitsDataModule(val_fraction=0.0)
    dm.setup()
    with pytest.raises(RuntimeError, match=r"val_dataloader\(\): the val split is empty"):
        dm.val_dataloader()
    dm = DigitsDataModule(test_fraction=0.0)
    dm.setup()
    with pytest.raises(RuntimeError, match=r"predict_dataloader\(\): the test split is empty"):
        dm.predict_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size=0\) expects a positive integer"),
        ({"batch_size": 2.5}, r"batch_size=2.5\) expects a positive integer"),
        ({"image_size": 4}, r"image_size=4\) expects an integer >= 8"),
        ({"channels": 2}, r"channels=2\) expects 1 \(grey\) or 3"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0\) expects a fraction in \[0, 1\)"),
        ({"test_fraction": -0.1}, r"test_fraction=-0.1\) expects a fraction in \[0, 1\)"),
        ({"val_fraction": float("nan")}, r"val_fraction=nan\) expects a fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"leaves no training data"),
        ({"num_workers": -1}, r"num_workers=-1\) expects an integer >= 0"),
    ],
)
def test_digits_datamodule_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_load_digits_damaged_file_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "digits.csv.gz").write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(RuntimeError, match=r"read 3 columns from digits.csv.gz, expected 65 .*reinstall fx-lightning"):
        load_digits()

"""Shared fixtures: a tiny digits CNN, the digits data in large batches, and a small CPU Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: Small and fast: a 4-channel DigitsCNN sees 3 training batches of 128 digits per epoch.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "max_epochs": 1,
    "limit_train_batches": 3,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}


@pytest.fixture
def digits() -> Any:
    """The packaged digits in batches of 128 (3 validation batches, 3 test batches)."""
    from fx_lightning.examples.data import DigitsDataModule

    return DigitsDataModule(batch_size=128)


@pytest.fixture
def tiny_cnn() -> Callable[..., Any]:
    """Factory for a seeded 4-channel :class:`~fx_lightning.examples.models.DigitsCNN`."""
    import lightning.pytorch as pl

    from fx_lightning.examples.models import DigitsCNN

    def make(seed: int = 0, **kwargs: Any) -> Any:
        pl.seed_everything(seed, verbose=False)
        return DigitsCNN(**({"width": 4, "lr": 0.05} | kwargs))

    return make


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., Any]:
    """Factory for a small CPU ``lightning.pytorch.Trainer`` writing under ``tmp_path``."""
    import lightning.pytorch as pl

    def make(**kwargs: Any) -> Any:
        return pl.Trainer(**(TRAINER_DEFAULTS | {"default_root_dir": tmp_path} | kwargs))

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one torch thread, then restore the count.

    Small inputs make zoo models many tiny ops: on a shared 2-core machine, two OpenMP threads per process
    oversubscribe the cores and run the zoo about ten times slower than one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

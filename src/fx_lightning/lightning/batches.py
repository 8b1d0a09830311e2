"""The batches FuseOnExport verifies on: where they come from, how many of them, and how each reaches the device.

The data is the validation data by default (then the data of the loop about to run), capped by the Trainer's
``limit_*_batches`` for that loop and by ``max_verify_batches``, or the ``verify_dataloader`` the user gave. A
one-shot iterable (a generator) is read once, up to the cap, and kept, so that every fusion sees every batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fx_lightning.lightning import compat
from fx_lightning.loaders import read_batches

_OWN_LOOP = {"test": "test", "predict": "predict", "validate": "validate"}


@dataclass
class Batches:
    """Re-iterable batches for one verification.

    Attributes:
        source: where they come from: ``"val"``, ``"test"``, ``"predict"``, ``"validate"`` (the Trainer's
            dataloaders for that loop) or ``"given"`` (``verify_dataloader``).
        loaders: the dataloaders (or lists of batches), each iterated afresh by every pass.
        limits: the number of batches to take from each loader (``None``: all).
        max_batches: the number of batches to take in all (``None``: all).
    """

    source: str
    loaders: list[Iterable[Any]]
    limits: list[int | None]
    max_batches: int | None = None

    def __iter__(self) -> Iterator[Any]:
        chained = itertools.chain.from_iterable(
            loader if limit is None else itertools.islice(loader, limit)
            for loader, limit in zip(self.loaders, self.limits)
        )
        return chained if self.max_batches is None else itertools.islice(chained, self.max_batches)

    def __len__(self) -> int:
        total = 0
        for loader, limit in zip(self.loaders, self.limits):
            length = _length(loader)
            if length is None and limit is None:
                raise TypeError("the number of batches is unknown")
            total += min(x for x in (length, limit) if x is not None)
        return total if self.max_batches is None else min(total, self.max_batches)

    def first(self) -> Any:
        """The first batch (``None`` when there is none); the batches stay complete for the next pass."""
        return next(iter(self), None)

    def describe(self) -> str:
        """The source, and the cap when one applies: ``"val, 2 batch(es) (limit_val_batches)"``."""
        caps = [f"{n} batch(es) per loader" for n in {lim for lim in self.limits if lim is not None}]
        if self.max_batches is not None:
            caps.append(f"at most {self.max_batches} (max_verify_batches)")
        return ", ".join([self.source, *caps])


@dataclass
class OnDevice:
    """Batches mapped by ``prepare`` (the transfer to the module's device) as they are read, re-iterable as the
    batches are: every pass of a check reads them afresh."""

    batches: Iterable[Any]
    prepare: Callable[[Any], Any]

    def __iter__(self) -> Iterator[Any]:
        return (self.prepare(batch) for batch in self.batches)


def calibration_batches(loaders: Any, count: int) -> list[Any]:
    """The first ``count`` batches of the (first) training dataloader, read once, as the user's loader gives them
    (:func:`fx_lightning.loaders.read_batches`: the loader's own generator is put back as found)."""
    found = _as_list(loaders)
    return read_batches(found[0], count) if found else []


def verification_batches(trainer: Any, stage: str, given: Iterable[Any] | None, max_batches: int | None) -> Batches:
    """The batches to verify on before ``stage`` (``"fit"``, ``"test"``, ``"predict"``, ``"validate"``).

    ``given`` (``verify_dataloader``) wins; otherwise the validation data, then the data of the loop about to
    run, each capped by the Trainer's ``limit_<loop>_batches``. No data: a :class:`Batches` with no loaders.
    """
    if given is not None:
        return Batches("given", [given], [None], max_batches)
    loops = ["val"] + ([_OWN_LOOP[stage]] if stage in _OWN_LOOP else [])
    for loop in loops:
        loaders = _as_list(compat.unsharded_dataloaders(trainer, loop))
        if loaders:
            limits = [_cap(compat.batch_limit(trainer, loop, _length(x)), _length(x)) for x in loaders]
            return Batches(loop, loaders, limits, max_batches)
    return Batches("none", [], [], max_batches)


def keep_one_shot(given: Iterable[Any] | None, max_batches: int | None) -> Iterable[Any] | None:
    """``given`` itself when it can be iterated again (a DataLoader, a list); a one-shot iterable (a generator, an
    iterator) read once into a list of at most ``max_batches`` batches, so that peeking at it loses nothing."""
    if not isinstance(given, Iterator):
        return given
    return list(given if max_batches is None else itertools.islice(given, max_batches))


def to_device(trainer: Any, pl_module: Any, batch: Any) -> Any:
    """Prepare a batch as Lightning's loops do: precision conversion, the transfer hooks, the device."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = compat.before_batch_transfer(pl_module, batch)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def _as_list(loaders: Any) -> list[Iterable[Any]]:
    """Lightning's multi-loader forms (a loader, a list/tuple/dict of loaders) as a list of loaders."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def _cap(limit: int | None, length: int | None) -> int | None:
    """The limit when it takes fewer batches than the loader has, else ``None`` (no cap)."""
    return None if limit is None or (length is not None and limit >= length) else limit


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None

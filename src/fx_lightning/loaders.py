"""Reading batches from the user's data loaders without disturbing them.

At the bottom of the import graph (it imports torch only): the int8 calibration of :mod:`fx_lightning.deploy` and the
Lightning layer read training batches the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch


def read_batches(batches: Iterable[Any], count: int) -> list[Any]:
    """The first ``count`` batches, read once. A shuffling DataLoader draws from its own generator
    (``DataLoader(generator=...)``, its sampler's), which is put back as found, so that the user's next epoch
    shuffles as it would have; the global generators are the caller's to keep
    (:func:`fx_lightning.verify.verifier.preserved_rng`).

    Example:
        >>> loader = torch.utils.data.DataLoader(range(10), shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> state = loader.generator.get_state()
        >>> len(read_batches(loader, 2)), torch.equal(state, loader.generator.get_state())
        (2, True)
    """
    candidates = (getattr(batches, "generator", None), getattr(getattr(batches, "sampler", None), "generator", None))
    generators = list({id(g): g for g in candidates if isinstance(g, torch.Generator)}.values())
    states = [g.get_state() for g in generators]
    try:
        return list(itertools.islice(batches, count))
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)

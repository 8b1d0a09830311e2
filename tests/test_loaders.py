"""fx_lightning.loaders.read_batches: the first batches of a loader, its shuffling left as found."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, RandomSampler


def epoch(loader: DataLoader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def test_read_batches_leaves_the_loader_generator_as_found() -> None:
    from fx_lightning.loaders import read_batches

    loader = DataLoader(range(20), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    twin = DataLoader(range(20), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    taken = read_batches(loader, 2)
    assert [b.tolist() for b in taken] == epoch(twin)[:2]
    twin.generator.manual_seed(0)
    assert epoch(loader) == epoch(twin)  # the next epoch shuffles as if nothing had been read


def test_read_batches_restores_a_sampler_generator() -> None:
    from fx_lightning.loaders import read_batches

    sampler = RandomSampler(range(12), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(range(12), batch_size=3, sampler=sampler)
    state = sampler.generator.get_state()
    assert len(read_batches(loader, 10)) == 4  # fewer batches than asked: all of them
    assert torch.equal(sampler.generator.get_state(), state)


def test_read_batches_of_a_list() -> None:
    from fx_lightning.loaders import read_batches

    assert read_batches([1, 2, 3], 2) == [1, 2]
    assert read_batches(iter([]), 5) == []

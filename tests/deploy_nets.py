"""A small Conv-BN-ReLU classifier, its fused form and labelled batches, shared by the deploy-artifact tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fx_lightning
from fx_lightning.testing import randomize_batch_norm

NUM_CLASSES = 5
EXAMPLE_BATCH = 4


def small_cnn(seed: int = 0) -> nn.Module:
    """Two Conv-BN-ReLU blocks and a linear head, BatchNorm statistics randomised so folding matters."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )
    return randomize_batch_norm(net, seed).eval()


@dataclass
class Case:
    """An original network, its fused form, the example inputs and verification batches labelled so that the
    original scores 0.8 accuracy (every fifth label is shifted)."""

    original: nn.Module
    fused: nn.Module
    example: tuple[Tensor, ...]
    batches: list[tuple[Tensor, Tensor]]

    @property
    def num_samples(self) -> int:
        return sum(len(y) for _, y in self.batches)


def make_case(sizes: tuple[int, ...] = (10, 10, 5), seed: int = 0) -> Case:
    original = small_cnn(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        x = torch.randn(size, 1, 6, 6, generator=gen)
        with torch.no_grad():
            y = original(x).argmax(dim=1)
        y[::5] = (y[::5] + 1) % NUM_CLASSES
        batches.append((x, y))
    example = (batches[0][0][:EXAMPLE_BATCH],)
    return Case(original, fx_lightning.fuse(original, example), example, batches)

"""count_kernels sees BatchNorm however it is called."""

from __future__ import annotations

import torch
from torch import nn

from engine_nets import ConvNormAct
from fx_lightning import count_kernels


def test_count_kernels_counts_module_and_functional_calls() -> None:
    model = nn.Sequential(ConvNormAct(3, 4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval()
    assert count_kernels(model, torch.randn(1, 3, 4, 4)) == 3


def test_count_kernels_counts_each_call_of_a_shared_module() -> None:
    bn = nn.BatchNorm1d(3).eval()
    model = nn.Sequential(bn, bn)
    assert count_kernels(model, torch.randn(2, 3)) == 2


def test_count_kernels_other_keyword() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1))
    assert count_kernels(model, torch.randn(1, 1, 2, 2), keyword="convolution") == 2

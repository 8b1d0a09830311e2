"""count_kernels sees BatchNorm kernels however they are called; count_batch_norms also sees frozen BatchNorms."""

from __future__ import annotations

import torch
from torch import nn

from engine_nets import ConvNormAct
from fx_lightning import count_kernels, fuse
from fx_lightning.fusion.counting import count_batch_norms
from fx_lightning.testing import randomize_batch_norm


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


def _with_frozen() -> nn.Sequential:
    from torchvision.ops import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    frozen.running_mean.normal_()
    frozen.weight.normal_()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), frozen, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    return randomize_batch_norm(net).eval()


def test_count_kernels_does_not_see_a_frozen_batch_norm() -> None:
    # FrozenBatchNorm2d normalises with a multiply and an add: no batch_norm kernel runs for it
    assert count_kernels(_with_frozen(), torch.randn(1, 3, 4, 4)) == 1
    assert count_kernels(_with_frozen(), torch.randn(1, 3, 4, 4), keyword="convolution") == 2


def test_count_batch_norms_counts_frozen_and_kernel_batch_norms() -> None:
    net = _with_frozen()
    x = torch.randn(1, 3, 4, 4)
    assert count_batch_norms(lambda: net(x), net) == 2
    shared = nn.BatchNorm1d(3).eval()
    twice = nn.Sequential(shared, shared)
    assert count_batch_norms(lambda: twice(torch.randn(2, 3)), twice) == 2  # each call counts, as for kernels


def test_count_batch_norms_after_fuse_counts_none_left() -> None:
    net = _with_frozen()
    x = torch.randn(1, 3, 4, 4)
    fused = fuse(net, example_inputs=(x,))
    assert fused.fusion_report.num_folded == 2
    assert count_batch_norms(lambda: fused(x), fused) == 0
    assert count_kernels(fused, x) == 0

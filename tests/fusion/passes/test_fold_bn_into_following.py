"""fold_bn_into_following: BatchNorm before an unpadded conv or a 2-D linear layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_nets import batch_norm_count
from fx_lightning import fuse
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err

# Only the BatchNorm passes, so that branch merging does not change the structures asserted here.
BN_PASSES = ["remove_dropout", "fold_bn_into_preceding", "fold_bn_into_following"]


def _fuse(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    randomize_batch_norm(model).eval()
    fused = fuse(model, passes=BN_PASSES)
    with torch.no_grad():
        return fused, rel_err(fused(x), model(x))


@pytest.mark.parametrize(("groups", "stride"), [(1, 1), (2, 2), (4, 1)])
def test_fold_bn_into_following_unpadded_conv(groups: int, stride: int) -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, stride, groups=groups))
    fused, err = _fuse(model, torch.randn(2, 4, 7, 7))
    assert err <= 1e-5
    assert [(r.bn, r.into, r.rule) for r in fused.fusion_report.folded] == [("1", "2", "fold_bn_into_following")]
    assert batch_norm_count(fused) == 0


def test_fold_bn_into_following_skips_padded_conv() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, padding=1))
    fused, err = _fuse(model, torch.randn(2, 4, 7, 7))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 0
    assert "pads its input" in fused.fusion_report.skipped[0].reason


def test_fold_bn_into_following_linear_on_2d_input() -> None:
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.BatchNorm1d(12), nn.Linear(12, 3))
    fused, err = _fuse(model, torch.randn(5, 3, 4))
    assert err <= 1e-5
    assert [r.rule for r in fused.fusion_report.folded] == ["fold_bn_into_following"]


def test_fold_bn_into_following_skips_conv_transpose() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 2, 2))
    fused, err = _fuse(model, torch.randn(2, 4, 3, 3))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 0
    assert "not a Conv/Linear call" in fused.fusion_report.skipped[0].reason


class TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x.relu())
        return self.conv(y) + y


def test_fold_bn_into_following_skips_output_with_two_readers() -> None:
    fused, err = _fuse(TwoReaders(), torch.randn(2, 4, 3, 3))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 0
    assert "read by 2 nodes" in fused.fusion_report.skipped[0].reason


class SharedConv(nn.Module):
    """The conv after the BatchNorm is also called on another input: the folded call gets its own layer."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x.relu())) + self.conv(x)


def test_fold_bn_into_following_conv_called_at_two_sites() -> None:
    fused, err = _fuse(SharedConv(), torch.randn(2, 4, 3, 3))
    assert err <= 1e-5
    assert [r.into for r in fused.fusion_report.folded] == ["conv_folded1"]

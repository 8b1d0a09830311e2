"""Small hand-written networks for the engine tests, each modelling one pattern users bring."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1, dims: int = 2) -> nn.Sequential:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](cin, cout, k, padding=k // 2, groups=groups, bias=False)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](cout)
    return nn.Sequential(conv, bn, nn.ReLU())


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm subclass that calls ``F.batch_norm`` itself and applies an activation, as timm's does."""

    def __init__(self, num_features: int, act: bool = True) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU() if act else nn.Identity()
        self.drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    """Conv followed by a BatchNorm-with-activation layer, the building block of many CNN libraries."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
        self.bn = BatchNormAct2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DataDependentBlock(nn.Module):
    """A block whose forward branches on tensor values, which torch.fx cannot trace."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


class LibraryStyleNet(nn.Module):
    """ConvNormAct blocks, a data-dependent block in the middle, a classifier head with BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, stride=2)
        self.mid = DataDependentBlock(8)
        self.tail = nn.Sequential(ConvNormAct(8, 16), ConvNormAct(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        self.bn_head = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tail(self.mid(self.stem(x)))
        return self.bn_head(self.fc(torch.flatten(self.pool(x), 1)))


def module_types(module: nn.Module) -> list[str]:
    """Class names of every sub-module, for structure assertions."""
    return [type(m).__name__ for m in module.modules()]


def batch_norm_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

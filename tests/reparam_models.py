"""Hand-written re-parameterisable networks (RepVGG and MobileOne style) with their hand-written deploy forms.

Each training-form block sums parallel branches; its ``reparameterize()`` builds the deploy form the way
these architectures' own code does (fold each BN, pad the 1x1 kernel, add an identity kernel), so the tests
can compare ``fuse`` against both the training form and the architecture's own deploy form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def _fold(branch: nn.Module | None, cout: int, cin_per_group: int, k: int) -> tuple[Tensor, Tensor]:
    """The deploy kernel ``(cout, cin/groups, k, k)`` and bias of one branch, as RepVGG's ``_fuse_bn_tensor``."""
    if branch is None:
        return torch.zeros(cout, cin_per_group, k, k), torch.zeros(cout)
    if isinstance(branch, nn.Sequential):
        kernel, bn = branch.conv.weight, branch.bn
        pad = (k - kernel.shape[-1]) // 2
        kernel = F.pad(kernel, [pad] * 4)
    else:
        bn = branch
        kernel = torch.zeros(cout, cin_per_group, k, k)
        for o in range(cout):
            kernel[o, o % cin_per_group, k // 2, k // 2] = 1.0
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


class RepVGGBlock(nn.Module):
    """RepVGG training-form block: ``relu(conv3x3-BN(x) + conv1x1-BN(x) + BN(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.cin, self.cout, self.stride, self.groups = cin, cout, stride, groups
        self.rbr_dense = conv_bn(cin, cout, 3, stride, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, groups)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + identity)

    @torch.no_grad()
    def reparameterize(self) -> nn.Module:
        """The hand-written deploy form: one 3x3 convolution with bias, then ReLU."""
        per_group = self.cin // self.groups
        weight, bias = torch.zeros(self.cout, per_group, 3, 3), torch.zeros(self.cout)
        for branch in (self.rbr_dense, self.rbr_1x1, self.rbr_identity):
            w, b = _fold(branch, self.cout, per_group, 3)
            weight, bias = weight + w, bias + b
        conv = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, groups=self.groups)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return nn.Sequential(conv, nn.ReLU())


class MobileOneBlock(nn.Module):
    """MobileOne training-form block: ``act(BN(x) + conv1x1-BN(x) + sum_i convkxk_i-BN(x))``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 3) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_scale = conv_bn(cin, cout, 1, stride, groups) if k > 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, groups) for _ in range(branches))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity_out = 0 if self.rbr_skip is None else self.rbr_skip(x)
        scale_out = 0 if self.rbr_scale is None else self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return self.act(out)

    @torch.no_grad()
    def reparameterize(self) -> nn.Module:
        """The hand-written deploy form: one kxk convolution with bias, then ReLU."""
        per_group = self.cin // self.groups
        weight, bias = torch.zeros(self.cout, per_group, self.k, self.k), torch.zeros(self.cout)
        for branch in (self.rbr_skip, self.rbr_scale, *self.rbr_conv):
            w, b = _fold(branch, self.cout, per_group, self.k)
            weight, bias = weight + w, bias + b
        conv = nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.k // 2, groups=self.groups)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return nn.Sequential(conv, nn.ReLU())


class _Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], channels: int, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1))

    def deploy(self) -> nn.Module:
        """The hand-written deploy form of the whole network."""
        net = _Net([b.reparameterize() for b in self.blocks], self.head.in_features, self.head.out_features)
        net.head.load_state_dict(self.head.state_dict())
        return net.eval()


def repvgg_net() -> nn.Module:
    """A small RepVGG-A style network: stride-2 stages, identity branches where shapes allow, a grouped block."""
    return _Net(
        [
            RepVGGBlock(3, 8, stride=2),
            RepVGGBlock(8, 8),
            RepVGGBlock(8, 16, stride=2),
            RepVGGBlock(16, 16),
            RepVGGBlock(16, 16, groups=4),
        ],
        16,
    )


def mobileone_net(branches: int = 3) -> nn.Module:
    """A small MobileOne-S style network: depthwise kxk blocks followed by pointwise 1x1 blocks."""
    blocks: list[nn.Module] = [MobileOneBlock(3, 8, 3, stride=2, branches=1)]
    for cin, cout, stride in ((8, 8, 1), (8, 16, 2), (16, 16, 1)):
        blocks.append(MobileOneBlock(cin, cin, 3, stride=stride, groups=cin, branches=branches))
        blocks.append(MobileOneBlock(cin, cout, 1, branches=branches))
    return _Net(blocks, 16)

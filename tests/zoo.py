"""Build every torchvision classification model with random weights, randomised BatchNorm and a small input.

Shared by ``tests/fusion/test_zoo.py`` and ``scripts/compare_reference.py``. Nothing is downloaded: every model is
built with ``weights=None``.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from fx_lightning.testing import randomize_batch_norm

BATCH = 2
SEED = 0

# Constructor arguments beyond ``weights=None``. The auxiliary heads only run in train mode and are not part
# of the eval function; explicit ``init_weights`` silences torchvision's FutureWarning.
_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
    # A ViT's positional embedding fixes its input size when it is built; 2x2 patches keep the largest
    # ones (vit_h_14, 632M parameters) cheap to run. ViTs have no BatchNorm, so this only shrinks the work.
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 64},
    "vit_h_14": {"image_size": 28},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 64},
}

# The smallest square input side each model runs on, found by trying sizes; 32 when not listed.
_INPUT_SIDE: dict[str, int] = {
    "alexnet": 63,
    "inception_v3": 75,
    # Every MaxViT stage partitions its feature map into 7x7 windows: the stride-32 map must be 7x7.
    "maxvit_t": 224,
    "vit_b_32": 64,
    "vit_h_14": 28,
    "vit_l_32": 64,
}

# Small, representative models for the default run; the rest of the zoo is marked slow.
FAST_MODELS = (
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "densenet121",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "googlenet",
    # Its MBConv pre-norm BatchNorm is folded into the following 1x1 conv, which torch.fx's fuse misses.
    "maxvit_t",
)


def zoo_names() -> list[str]:
    """Every torchvision classification model name, sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def input_side(name: str) -> int:
    """The square input side used for ``name``: the smallest its eval forward accepts."""
    return _INPUT_SIDE.get(name, 32)


def build(name: str, seed: int = SEED) -> nn.Module:
    """Build ``name`` with seeded random weights and randomised BatchNorm statistics, in train mode."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **_KWARGS.get(name, {}))
    with torch.no_grad():
        for param in model.parameters():
            # ViT heads start at zero, which would make every output 0 and every comparison vacuous.
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    return randomize_batch_norm(model, seed)


def example_input(name: str, seed: int = SEED) -> torch.Tensor:
    """A seeded ``(BATCH, 3, side, side)`` float32 input for ``name``."""
    side = input_side(name)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, side, side, generator=gen)


class _SharedConv(nn.Module):
    """One conv module called at two sites, only the first followed by BN (pytorch/pytorch#104593)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x.flip(-1))


class _LinearBatchNorm3d(nn.Module):
    """``Linear`` over the last dim of ``(N, C, L)`` then ``BatchNorm1d(C)``, which normalises dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class _GroupedConvTransposeBatchNorm(nn.Module):
    """``ConvTranspose2d(groups > 1, in_channels == out_channels)`` then BN over its output channels."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(8, 8, 3, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def reference_pitfalls(seed: int = SEED) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Small models on which ``torch.fx.experimental.optimization.fuse`` is wrong or gives up.

    Returns:
        ``(name, model in train mode with randomised BN, input)`` triples.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cases: list[tuple[str, nn.Module, torch.Tensor]] = [
        ("conv called twice, one site followed by BN", _SharedConv(), torch.randn(2, 4, 8, 8, generator=gen)),
        ("Linear + BatchNorm1d on (N, C, L)", _LinearBatchNorm3d(), torch.randn(2, 8, 16, generator=gen)),
        (
            "ConvTranspose2d(8, 8, groups=2) + BN",
            _GroupedConvTransposeBatchNorm(2),
            torch.randn(2, 8, 5, 5, generator=gen),
        ),
        (
            "ConvTranspose2d(8, 8, groups=8) + BN",
            _GroupedConvTransposeBatchNorm(8),
            torch.randn(2, 8, 5, 5, generator=gen),
        ),
    ]
    return [(name, randomize_batch_norm(model, seed), x) for name, model, x in cases]

"""fuse gives back the user's own network: same class, every method working on the fused layers.

Real LightningModules call more than ``forward``: timm's ``forward_features``/``forward_head``, torchvision's
``.features`` and ``.backbone``, segmentation_models_pytorch's ``.encoder``, their own methods. Each must run on
the fused copy, give the original's outputs and run no BatchNorm kernel where every BatchNorm folds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import Tensor, fx, nn

from fx_lightning import count_kernels, fuse
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err as _rel_err

RTOL = 1e-5


def _output_rel_err(out: Any, ref: Any) -> float:
    out = out["out"] if isinstance(out, dict) else out[-1] if isinstance(out, (list, tuple)) else out
    ref = ref["out"] if isinstance(ref, dict) else ref[-1] if isinstance(ref, (list, tuple)) else ref
    return _rel_err(out, ref)


class EmbeddingNet(nn.Module):
    """A user's own network with a method besides forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def embed(self, x: Tensor) -> Tensor:
        return self.stem(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def _smp_unet() -> nn.Module:
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.Unet("resnet18", encoder_weights=None, classes=3)


CASES: list[tuple[str, Callable[[], nn.Module], list[str], tuple[int, ...]]] = [
    ("timm resnet18", lambda: timm.create_model("resnet18", pretrained=False), ["forward_features"], (3, 64, 64)),
    ("timm efficientnet_b0", lambda: timm.create_model("efficientnet_b0"), ["forward_features"], (3, 64, 64)),
    ("torchvision mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), ["features"], (3, 64, 64)),
    (
        "torchvision deeplabv3",
        lambda: torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None),
        ["backbone"],
        (3, 64, 64),
    ),
    ("smp Unet", _smp_unet, ["encoder"], (3, 64, 64)),
    ("own embed", EmbeddingNet, ["embed"], (3, 8, 8)),
]


@pytest.mark.parametrize(("factory", "methods", "shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fuse_keeps_the_class_and_every_method(
    factory: Callable[[], nn.Module], methods: list[str], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(factory()).eval()
    x = torch.randn(2, *shape)
    fused = fuse(model)
    assert type(fused) is type(model)
    assert not isinstance(fused, fx.GraphModule)
    report = fused.fusion_report
    assert report.skipped == [], str(report)
    with torch.no_grad():
        assert _output_rel_err(fused(x), model(x)) <= RTOL
        for name in methods:
            method = getattr(fused, name)
            assert _output_rel_err(method(x), getattr(model, name)(x)) <= RTOL, name
    assert count_kernels(fused, x) == 0


def test_fuse_timm_forward_head_runs_on_fused_features() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(timm.create_model("resnet18", num_classes=5)).eval()
    fused = fuse(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = fused.forward_features(x)
        assert _output_rel_err(fused.forward_head(features), model.forward_head(model.forward_features(x))) <= RTOL


def test_fuse_keeps_dropout_modules_for_mc_dropout() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 2))
    ).eval()
    fused = fuse(model)
    assert isinstance(fused[3], nn.Dropout)
    fused[3].train()  # Monte Carlo dropout: switched on at prediction time
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        samples = torch.stack([fused(x) for _ in range(4)])
    assert samples.std(dim=0).max() > 0


def test_fuse_folded_batch_norm_identity_still_shows_its_tensors() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    fused = fuse(model)
    assert isinstance(fused[1], nn.Identity)
    assert torch.equal(fused[1].weight, model[1].weight)
    assert fused[1].eps == model[1].eps
    # ...but not in the state dict: the fused network's state never holds statistics it does not apply.
    assert sorted(fused.state_dict()) == ["0.bias", "0.weight"]

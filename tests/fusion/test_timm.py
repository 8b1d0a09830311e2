"""``fuse`` on real timm models (built without weights): the layers timm users actually fuse.

* Re-parameterisable families (RepVGG, MobileOne, FastViT, RepGhost): ``fuse`` leaves as few convolutions as
  timm's own hand-written ``reparameterize()`` deploy form, and no BatchNorm.
* Families built on timm's ``BatchNormAct2d`` and friends: every BatchNorm is folded or reported.

Outputs are compared with a float64 run of the original: the fused float32 model must be as close to it as
the original float32 model is (deep nets with random BatchNorm statistics amplify rounding).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

from fx_lightning import count_kernels, fuse
from fx_lightning.testing import randomize_batch_norm

SIZE = 64
# Small inputs make these models many tiny ops: one thread each (see the one_thread fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    randomize_batch_norm(model)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_outputs(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """The fused float32 output is within 1.5x the original's own float32 error of a float64 reference."""
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        scale = truth.abs().max()
        own = ((model(x).double() - truth).abs().max() / scale).item()
        ours = ((fused(x).double() - truth).abs().max() / scale).item()
    assert ours <= 1.5 * own + 1e-6, (ours, own)


def _convs(model: nn.Module, x: torch.Tensor) -> int:
    return count_kernels(model, x, keyword="conv")


REPARAM = [
    "repvgg_a0",
    "fastvit_t8",
    pytest.param("mobileone_s0", marks=pytest.mark.slow),
    pytest.param("repghostnet_050", marks=pytest.mark.slow),
    pytest.param("repvit_m0_9", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", REPARAM)
def test_timm_reparam_model_fuses_to_timm_deploy_form(name: str) -> None:
    model = _build(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    before = _state(model)
    # The example batch settles the rank of RepViT's head (mean over H, W, then BatchNorm1d and Linear).
    fused = fuse(model, example_inputs=(x,))
    assert fused.fusion_report.reverted == []
    deploy = reparameterize_model(copy.deepcopy(model))
    assert _convs(fused, x) == _convs(deploy, x)  # RepGhost merges BatchNorm-only branches: no conv fewer
    assert count_kernels(fused, x) == 0  # timm's own deploy form of FastViT keeps 10
    assert not fused.fusion_report.skipped
    assert fused.fusion_report.merged
    _check_outputs(model, fused, x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# Every BatchNorm of these folds (timm's BatchNormAct2d, ConvNormAct, SE/ECA/CBAM blocks, HRNet fusions, ...).
FULLY_FOLDED = [
    "resnet18",
    "efficientnet_b0",
    *(
        pytest.param(name, marks=pytest.mark.slow)
        for name in (
            "efficientnetv2_s",  # deep enough that float32 rounding shows: compared against float64
            "mobilenetv3_large_100",
            "mixnet_s",  # BatchNorm after MixedConv2d's concatenation, split over its convolutions
            "tf_mixnet_s",  # the same over TF-"same" convolutions (Conv2dSame: pads, then convolves)
            "regnety_008_tv",
            "rexnet_100",
            "dla34",
            "cspdarknet53",
            "ghostnet_050",
            "hrnet_w18",
            "mobilevit_s",
            "efficientvit_b0",
            "hgnetv2_b0",
            "res2net50d",
            "fbnetv3_b",
        )
    ),
]


@pytest.mark.parametrize("name", FULLY_FOLDED)
def test_timm_model_folds_every_batch_norm(name: str) -> None:
    model = _build(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    fused = fuse(model)
    assert type(fused) is type(model)  # the user's network, with fused layers in place
    assert count_kernels(model, x) > 0
    assert count_kernels(fused, x) == 0
    assert not fused.fusion_report.skipped
    _check_outputs(model, fused, x)


# These keep BatchNorms no layer next to them can absorb exactly (after a concatenation of earlier features, an
# addition, or an activation); each one left is reported with its reason.
PARTLY_FOLDED = ["densenet121", "resnetv2_18", "coatnet_nano_cc_224", "xcit_nano_12_p8_224"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PARTLY_FOLDED)
def test_timm_model_reports_every_batch_norm_left(name: str) -> None:
    model = _build(name)
    size = 224 if name.startswith(("coatnet", "xcit")) else SIZE
    x = torch.randn(2, 3, size, size)
    fused = fuse(model)
    left = count_kernels(fused, x)
    assert 0 < left < count_kernels(model, x)
    assert left == len(fused.fusion_report.skipped)
    assert all(s.reason for s in fused.fusion_report.skipped)
    _check_outputs(model, fused, x)


@pytest.mark.slow
def test_timm_nfnet_keeps_its_in_place_gains() -> None:
    # NFNet has no BatchNorm layer (its F.batch_norm calls standardise weights) but multiplies in place
    # (out.mul_(self.skipinit_gain)) without using the result: removing dead code must keep those calls.
    model = _build("dm_nfnet_f0")
    x = torch.randn(2, 3, SIZE, SIZE)
    fused = fuse(model, form="graph")
    assert fused.fusion_report.num_folded == 0
    assert fused.fusion_report.removed  # Identity calls went, so the graph was rewritten and cleaned
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(fuse(model)(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_timm_levit_folds_linear_norms_given_example_inputs() -> None:
    # LeViT's LinearNorm normalises linear(x).flatten(0, 1): foldable once the 3-D shape is known, and its
    # attention-bias cache, filled during tracing, must stay empty in the caller's model.
    model = _build("levit_128s")
    x = torch.randn(2, 3, 224, 224)
    assert count_kernels(model, x) == 52
    for module in model.modules():
        if hasattr(module, "attention_bias_cache"):
            module.attention_bias_cache.clear()
    fused = fuse(model, example_inputs=(x,))
    assert count_kernels(fused, x) == 0
    assert all(not m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache"))
    _check_outputs(model, fused, x)
    without_shapes = fuse(model).fusion_report
    assert without_shapes.num_skipped == 35
    # Without shapes, ranks are unknown: 33 LinearNorms and the two heads' BatchNorm1d before a Linear stay.
    reasons = [s.reason for s in without_shapes.skipped]
    assert sum("flatten(0, 1) puts the Linear's features" in r for r in reasons) == 33
    assert sum("may not see 2-D input" in r for r in reasons) == 2

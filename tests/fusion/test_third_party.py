"""``fuse`` on what third-party code hides: TF-"same" convolutions, shape arithmetic on proxies, untraced roots.

Models are built without weights (tiny Hugging Face configs, ``weights=None``), with random BatchNorm statistics
(FrozenBatchNorm2d's buffers too), and compared with the original on the same input: max error relative to the
output's magnitude <= 1e-4. BatchNorms are counted as the kernels that run (:func:`fx_lightning.count_kernels`).
The rules themselves are pinned on small hand-written modules first.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves
from torchvision.ops.misc import FrozenBatchNorm2d

from fx_lightning import count_kernels, fuse
from fx_lightning.fusion.padded_conv import chained_children, padded_conv_family, reads_only_settings
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random statistics in every BatchNorm, FrozenBatchNorm2d included."""
    randomize_batch_norm(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 0.5 + 0.75)
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 0.5 + 0.75)
    return model.eval()


def _worst(outputs: object, reference: object) -> float:
    """The largest relative error over the floating-point output leaves of the same shape."""
    pairs = zip(tree_leaves(outputs), tree_leaves(reference))
    errors = [
        rel_err(o, r)
        for o, r in pairs
        if isinstance(r, torch.Tensor) and r.is_floating_point() and r.numel() and o.shape == r.shape
    ]
    assert errors, "no continuous output to compare"
    return max(errors)


def _check_exact(model: nn.Module, inputs: tuple, *, bn_after: int = 0) -> nn.Module:
    """Fuse with ``inputs``; assert ``bn_after`` BatchNorm kernels remain and the output matches. Returns the fused."""
    with torch.no_grad():
        reference = model(*inputs)
    fused = fuse(model, example_inputs=inputs)
    assert fused.fusion_report.reverted == []
    assert count_kernels(fused, *inputs) == bn_after, fused.fusion_report.skipped
    with torch.no_grad():
        assert _worst(fused(*inputs), reference) <= 1e-4
    return fused


# ----------------------------------------------------------------------------------------------- padded convs


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    size = int(x.shape[-1])
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return F.pad(x, [total // 2, total - total // 2] * 2)


class DynamicSameConv(nn.Conv2d):
    """TF-"same" padding computed from the input's size with ``int()``, which torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih = int(x.shape[-1])
        pad = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + self.weight.size(-1) - ih, 0)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StaticSameConv(nn.Conv2d):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k)
        self.static_padding = nn.ZeroPad2d((0, k - 1, 0, k - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: the forward computes from the weight's values, so nothing may fold into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean()) / (w.std() + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class BiasReadingConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bias.mean()
        return F.conv2d(x, self.weight, self.bias, self.stride)


class SelfPassingConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _inspect(self, x)
        return F.conv2d(x, self.weight, self.bias, self.stride)


def _inspect(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return x * conv.weight.mean()


def test_padded_conv_family_proves_pad_then_convolve() -> None:
    assert padded_conv_family(DynamicSameConv(2, 3, 3, stride=2)) is nn.Conv2d
    assert padded_conv_family(StaticSameConv(2, 3, 3)) is nn.Conv2d


@pytest.mark.parametrize("cls", [StandardisedConv, BiasReadingConv, SelfPassingConv])
def test_padded_conv_family_refuses_reads_of_weight_values(cls: type[nn.Conv2d]) -> None:
    assert padded_conv_family(cls(2, 3, 3)) is None


def test_padded_conv_family_refuses_a_padding_module_that_holds_tensors() -> None:
    conv = StaticSameConv(2, 3, 3)
    conv.static_padding = nn.Conv2d(2, 2, 1)  # runs before the convolution, but holds a weight of its own
    assert padded_conv_family(conv) is None


@pytest.mark.parametrize("conv", [DynamicSameConv(3, 6, 3, stride=2), StaticSameConv(3, 6, 3)])
def test_fold_into_padded_conv_is_exact_without_example_inputs(conv: nn.Conv2d) -> None:
    net = _randomised(nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU()))
    x = torch.randn(2, 3, 9, 9)
    fused = fuse(net)
    assert [type(m) for m in fused] == [type(conv), nn.Identity, nn.ReLU]
    assert fused.fusion_report.num_folded == 1
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-5


def test_fold_into_weight_standardised_conv_is_left_with_reason() -> None:
    net = _randomised(nn.Sequential(StandardisedConv(3, 6, 3), nn.BatchNorm2d(6)))
    fused = fuse(net, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert fused.fusion_report.num_folded == 0
    assert "computed in the graph" in fused.fusion_report.skipped[0].reason


def test_batch_norm_before_padded_conv_is_not_folded_into_it() -> None:
    # Folding a BatchNorm into the layer after it would shift the padded zeros: not exact, so not done.
    net = _randomised(nn.Sequential(nn.BatchNorm2d(3), DynamicSameConv(3, 4, 3, stride=2)))
    x = torch.randn(2, 3, 9, 9)
    fused = fuse(net, example_inputs=(x,))
    assert fused.fusion_report.num_folded == 0
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-6


# ----------------------------------------------------------------------------------------------- wrapped calls


def tf_padding(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Hugging Face's apply_tf_padding in small: ``int()`` on the input's size, the layer read for its settings."""
    size = int(x.shape[-1])
    stride, kernel = conv.stride[0], conv.kernel_size[0]
    total = max(kernel - (size % stride if size % stride else stride), 0)
    return F.pad(x, [total // 2, total - total // 2] * 2)


def weight_padding(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return x + conv.weight.sum() * 0 + int(x.shape[-1]) * 0


class TFPaddedLayer(nn.Module):
    def __init__(self, reads_weight: bool = False) -> None:
        super().__init__()
        self.reads_weight = reads_weight
        self.convolution = nn.Conv2d(3, 5, 3, stride=2)
        self.normalization = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = weight_padding(x, self.convolution) if self.reads_weight else tf_padding(x, self.convolution)
        return self.normalization(self.convolution(x)).relu()


def test_reads_only_settings() -> None:
    assert reads_only_settings(tf_padding, "conv")
    assert not reads_only_settings(weight_padding, "conv")


def test_untraceable_helper_becomes_one_call_and_the_layer_folds() -> None:
    net = _randomised(nn.Sequential(TFPaddedLayer(), nn.Flatten()))
    x = torch.randn(2, 3, 11, 11)
    fused = fuse(net)
    assert fused.fusion_report.num_folded == 1
    assert fused.fusion_report.untraced == []
    assert isinstance(fused[0].normalization, nn.Identity)
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-5


def test_helper_that_reads_the_weight_leaves_the_layer_unfolded() -> None:
    net = _randomised(nn.Sequential(TFPaddedLayer(reads_weight=True), nn.Flatten()))
    x = torch.randn(2, 3, 11, 11)
    fused = fuse(net, example_inputs=(x,))
    assert fused.fusion_report.num_folded == 0
    assert [u.path for u in fused.fusion_report.untraced] == ["0"]
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-6


# ----------------------------------------------------------------------------------------------- untraced roots


class UntracedHead(nn.Module):
    """Control flow on a proxy in its own forward; a conv then a BatchNorm called in sequence."""

    def __init__(self, reader: bool = False) -> None:
        super().__init__()
        self.reader = reader
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        h = self.conv(x)
        h = self.bn(h)
        return h.relu()


class UntracedHeadWithReader(UntracedHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        h = self.conv(x)
        h = self.bn(h)
        return h + self.conv.weight.mean()


class UntracedHeadWithMethod(UntracedHead):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # another method calls the layer alone: after a fold it would return other values


class NestedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def _reads_conv(x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    return x * owner.conv.weight.mean()


class SelfPassingHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _reads_conv(x, self) if x.sum() > 0 else x
        return self.bn(self.conv(x))


def test_chained_children_proven_from_source() -> None:
    assert chained_children(UntracedHead) == (("conv", "bn"),)
    assert chained_children(NestedHead) == (("conv", "bn"),)
    assert chained_children(UntracedHeadWithReader) == ()
    assert chained_children(UntracedHeadWithMethod) == ()
    assert chained_children(SelfPassingHead) == ()


def test_batch_norm_chained_after_conv_folds_under_untraced_parent() -> None:
    net = _randomised(UntracedHead())
    x = torch.randn(2, 4, 6, 6)
    fused = fuse(net)
    assert isinstance(fused.bn, nn.Identity)
    assert type(fused) is UntracedHead
    assert [(r.bn, r.into) for r in fused.fusion_report.folded] == [("bn", "conv")]
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-5
        assert rel_err(fused(-x), net(-x)) <= 1e-5  # the other branch of the control flow


def test_conv_read_elsewhere_under_untraced_parent_is_not_folded() -> None:
    fused = fuse(_randomised(UntracedHeadWithReader()))
    assert fused.fusion_report.num_folded == 0
    assert "could not be traced" in fused.fusion_report.skipped[0].reason


class FrozenBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 1), FrozenBatchNorm2d(8)) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        for block in self.blocks:
            x = block(x)
        return x


class Detector(nn.Module):
    """An untraced root over a backbone whose norms (FrozenBatchNorm2d) check no input rank of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = FrozenBackbone()

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        batch = torch.stack(images)
        features = self.backbone(batch)
        return [f for f in features]


def test_frozen_batch_norm_under_untraced_root_gets_ranks_from_example_inputs() -> None:
    net = _randomised(Detector())
    images = [torch.rand(3, 10, 12), torch.rand(3, 10, 12)]
    fused = _check_exact(net, (images,))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    assert fused.fusion_report.num_folded == 3
    # the ModuleList, which has no forward, is gone into rather than reported as untraced
    assert [u.path for u in fused.fusion_report.untraced] == ["<model>"]


def test_frozen_batch_norm_under_untraced_root_without_example_inputs_is_left_with_reason() -> None:
    fused = fuse(_randomised(Detector()))
    assert fused.fusion_report.num_folded == 0
    assert all("rank" in s.reason for s in fused.fusion_report.skipped), fused.fusion_report.skipped


class TwoShapes(nn.Module):
    """The same block called on two input sizes: what one call receives does not settle every call's shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.block(x) + self.block(x[:, :, :2, :2]).mean()


def test_part_called_with_different_shapes_gets_no_ranks() -> None:
    fused = fuse(_randomised(TwoShapes()), example_inputs=(torch.randn(1, 3, 4, 4),))
    assert fused.fusion_report.num_folded == 0
    assert "rank" in fused.fusion_report.skipped[0].reason


# ----------------------------------------------------------------------------------------------- real models


def test_hf_mobilenet_v2_folds_every_batch_norm() -> None:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    config = MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=4)
    model = _randomised(MobileNetV2ForImageClassification(config))
    x = torch.randn(1, 3, 32, 32)
    assert count_kernels(model, x) == 52
    _check_exact(model, (x,))


def test_hf_levit_folds_every_batch_norm() -> None:
    from transformers import LevitConfig, LevitForImageClassification

    torch.manual_seed(0)
    config = LevitConfig(
        image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 1, 2], depths=[1, 1, 1],
        key_dim=[8, 8, 8], num_labels=4,
    )  # fmt: skip
    model = _randomised(LevitForImageClassification(config))
    x = torch.randn(2, 3, 32, 32)
    assert count_kernels(model, x) > 20
    _check_exact(model, (x,))


def test_hf_efficientnet_top_bn_under_untraced_encoder_folds() -> None:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    torch.manual_seed(0)
    config = EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=4
    )
    model = _randomised(EfficientNetForImageClassification(config))
    fused = _check_exact(model, (torch.randn(1, 3, 32, 32),))
    assert "efficientnet.encoder" in [u.path for u in fused.fusion_report.untraced]
    assert ("efficientnet.encoder.top_bn", "efficientnet.encoder.top_conv") in [
        (r.bn, r.into) for r in fused.fusion_report.folded
    ]


def test_smp_fpn_efficientnet_encoder_folds_every_batch_norm() -> None:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = _randomised(smp.FPN("efficientnet-b0", encoder_weights=None, classes=2))
    x = torch.randn(1, 3, 64, 64)
    assert count_kernels(model, x) == 48
    _check_exact(model, (x,))


def test_timm_tf_efficientnet_folds_every_batch_norm() -> None:
    import timm

    torch.manual_seed(0)
    model = _randomised(timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=4))
    x = torch.randn(1, 3, 64, 64)
    assert count_kernels(model, x) == 49
    _check_exact(model, (x,))


def _frozen_detector(name: str) -> nn.Module:
    """A torchvision detector as fine-tuning builds it: FrozenBatchNorm2d in the backbone, no weights."""
    from torchvision.models import detection
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    size = {"min_size": 64, "max_size": 96}
    if name == "fasterrcnn_mobilenet_v3_large_fpn":
        backbone = mobilenet_backbone(
            backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=FrozenBatchNorm2d
        )
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        return detection.FasterRCNN(backbone, num_classes=3, rpn_anchor_generator=anchors, **size)
    depth = "resnet18" if name == "fasterrcnn_resnet18_fpn" else "resnet50"
    if name == "retinanet_resnet50_fpn":
        backbone = resnet_fpn_backbone(
            backbone_name=depth, weights=None, norm_layer=FrozenBatchNorm2d, returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(256, 256),
        )  # fmt: skip
        return detection.RetinaNet(backbone, num_classes=3, **size)
    backbone = resnet_fpn_backbone(backbone_name=depth, weights=None, norm_layer=FrozenBatchNorm2d)
    cls = detection.MaskRCNN if name == "maskrcnn_resnet50_fpn" else detection.FasterRCNN
    return cls(backbone, num_classes=3, **size)


def _check_detector(name: str) -> None:
    model = _randomised(_frozen_detector(name))
    images = [torch.rand(3, 64, 80)]
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    fused = fuse(model, example_inputs=(images,))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    assert fused.fusion_report.num_folded == frozen
    # Post-NMS boxes are discrete; the continuous parts are the backbone's feature maps.
    batch = model.transform(images)[0].tensors
    with torch.no_grad():
        assert _worst(fused.backbone(batch), model.backbone(batch)) <= 1e-4


def test_frozen_batch_norm_detector_folds_every_norm() -> None:
    _check_detector("fasterrcnn_resnet18_fpn")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"],
)
def test_frozen_batch_norm_detectors_fold_every_norm(name: str) -> None:
    _check_detector(name)


# ----------------------------------------------------------------------------------------------- Linear + BN1d


class LinearViewsNorm(nn.Module):
    """A Linear on (N, L, F) tokens, views in between, and a BatchNorm1d over the features."""

    def __init__(self, views: str) -> None:
        super().__init__()
        self.views = views
        self.linear = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.views == "permute":
            return self.bn(y.permute(0, 2, 1)).transpose(1, 2)
        if self.views == "reshape":
            return self.bn(y.reshape(-1, 8).contiguous()).view_as(y)
        if self.views == "transpose_flatten":
            return self.bn(y.transpose(0, 1).flatten(0, 1)).reshape_as(y)
        # splits the features over two dims: dim 1 is no longer the Linear's features
        return self.bn(y.reshape(y.shape[0], 8, -1))


@pytest.mark.parametrize("views", ["permute", "reshape", "transpose_flatten"])
def test_linear_and_batch_norm_1d_fold_through_views_with_example_inputs(views: str) -> None:
    net = _randomised(LinearViewsNorm(views))
    x = torch.randn(3, 5, 6)
    fused = _check_exact(net, (x,))
    assert isinstance(fused.bn, nn.Identity)


@pytest.mark.parametrize("views", ["permute", "reshape"])
def test_linear_and_batch_norm_1d_through_views_without_example_inputs_is_left(views: str) -> None:
    fused = fuse(_randomised(LinearViewsNorm(views)))
    assert fused.fusion_report.num_folded == 0
    assert fused.fusion_report.skipped[0].bn == "bn"


def test_linear_features_split_by_a_view_are_not_folded() -> None:
    net = _randomised(LinearViewsNorm("split"))
    x = torch.randn(3, 4, 6)
    fused = fuse(net, example_inputs=(x,))
    assert fused.fusion_report.num_folded == 0
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= 1e-6

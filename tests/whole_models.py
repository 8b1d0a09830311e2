"""Whole shipped models (detectors, segmenters, YOLO, Hugging Face, smp, timm), built without weights or downloads.

Shared by ``tests/fusion/test_whole_models.py`` and ``scripts/fuse_cost.py``. Each builder returns a
:class:`WholeModel`: the network in eval mode with seeded random weights and randomised BatchNorm statistics
(frozen ones included, so that a wrong fold shows), a matching example input, and a function that computes the
network's continuous parts. Inputs are small by default, so that one eager forward stays around a second or less on
2 CPU threads; each builder takes the image side (``side``), and :data:`DEPLOY_SIDES` holds the sizes these models
are deployed at (``build(name, side=DEPLOY_SIDES[name])``).

Nothing is downloaded: torchvision models are built with ``weights=None, weights_backbone=None``, ultralytics
YOLO from its bundled yaml (with ``YOLO_OFFLINE`` set, so its import makes no network check), Hugging Face
models from a config, segmentation_models_pytorch with ``encoder_weights=None``, timm with ``pretrained=False``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import detection
from torchvision.ops import FrozenBatchNorm2d

from fx_lightning.testing import randomize_batch_norm

SEED = 0


@dataclass
class WholeModel:
    """One whole network with its example input.

    Attributes:
        name: the registry key.
        model: the network, in eval mode, BatchNorm statistics randomised.
        example_inputs: positional inputs of one forward call (``fuse(model, example_inputs=...)``).
        parts: ``parts(module)`` runs ``module`` (the original or a fused copy) on the example input and returns
            the outputs of fixed shape to compare: the whole output for a network without post-processing, the
            backbone features and head outputs for a detector (whose detections vary after NMS).
        post_processed: the whole output is post-processed (NMS detections whose count may vary with rounding).
    """

    name: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    parts: Callable[[nn.Module], Any]
    post_processed: bool = False


def _image(side: int, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=gen)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Randomise every BatchNorm's statistics and affine parameters, torchvision's ``FrozenBatchNorm2d`` included.

    Returns:
        ``model`` in eval mode, for chaining.
    """
    randomize_batch_norm(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            for name in ("running_mean", "bias"):
                getattr(module, name).copy_(torch.randn(module.weight.shape, generator=gen) * 0.1)
            for name in ("running_var", "weight"):
                getattr(module, name).copy_(torch.rand(module.weight.shape, generator=gen) * 0.5 + 0.75)
    return model.eval()


def _whole(name: str, model: nn.Module, inputs: tuple[Any, ...]) -> WholeModel:
    """A network whose whole output is continuous and of fixed shape."""
    randomize_norms(model)
    return WholeModel(name, model, inputs, lambda module: module(*inputs))


# ----------------------------------------------------------------------------------------------- torchvision

# Fixed proposals for the region heads, so that their outputs do not depend on the NMS upstream of them.
_PROPOSALS = ((0.0, 0.0, 40.0, 40.0), (8.0, 16.0, 96.0, 80.0), (30.0, 20.0, 60.0, 120.0))


def _detector_parts(images: list[torch.Tensor]) -> Callable[[nn.Module], dict[str, Any]]:
    """The continuous parts of a torchvision detector: backbone features, RPN/dense head, box and mask heads."""

    def parts(model: nn.Module) -> dict[str, Any]:
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        if isinstance(features, torch.Tensor):
            features = {"0": features}
        levels = list(features.values())
        out: dict[str, Any] = {"features": dict(features)}
        if hasattr(model, "head"):  # RetinaNet, SSD
            out["head"] = model.head(levels)
        if hasattr(model, "rpn"):
            out["rpn"] = model.rpn.head(levels)
        roi = getattr(model, "roi_heads", None)
        if roi is not None:
            boxes = [torch.tensor(_PROPOSALS) for _ in batch.image_sizes]
            pooled = roi.box_roi_pool(features, boxes, batch.image_sizes)
            out["box"] = roi.box_predictor(roi.box_head(pooled))
            if roi.has_mask():
                pooled = roi.mask_roi_pool(features, boxes, batch.image_sizes)
                out["mask"] = roi.mask_predictor(roi.mask_head(pooled))
        return out

    return parts


def _detector(name: str, model: nn.Module, side: int, images: int = 1) -> WholeModel:
    randomize_norms(model)
    inputs = [_image(side, SEED + i)[0] for i in range(images)]
    return WholeModel(name, model, (inputs,), _detector_parts(inputs), post_processed=True)


def _small(side: int, two_stage: bool = True) -> dict[str, Any]:
    # The transform resizes every image to min_size..max_size; a small size keeps one forward cheap, and so do
    # fewer proposals (the box head runs once per proposal, 1000 by default, and the mask head once per detection).
    kwargs: dict[str, Any] = {"min_size": side, "max_size": side}
    if two_stage:
        kwargs.update(rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, box_detections_per_img=5)
    else:
        kwargs.update(topk_candidates=100, detections_per_img=5)
    return kwargs


def fasterrcnn_mobilenet_v3_large_320_fpn(side: int = 160) -> WholeModel:
    """torchvision's Faster R-CNN with a MobileNetV3-Large FPN backbone (BatchNorm2d, as trained from scratch)."""
    torch.manual_seed(SEED)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, **_small(side))
    return _detector("fasterrcnn_mobilenet_v3_large_320_fpn", model, side)


def fasterrcnn_resnet50_fpn_v2(side: int = 128) -> WholeModel:
    """torchvision's Faster R-CNN v2: BatchNorm in the ResNet-50 backbone and in the box head."""
    torch.manual_seed(SEED)
    model = detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **_small(side))
    return _detector("fasterrcnn_resnet50_fpn_v2", model, side)


def retinanet_resnet50_fpn(side: int = 128) -> WholeModel:
    """torchvision's RetinaNet with a ResNet-50 FPN backbone (BatchNorm2d)."""
    torch.manual_seed(SEED)
    model = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, **_small(side, False))
    return _detector("retinanet_resnet50_fpn", model, side)


def ssdlite320_mobilenet_v3_large(side: int = 320) -> WholeModel:
    """torchvision's SSDlite: 70 BatchNorms in the MobileNetV3 backbone, its extra layers and the separable head.

    SSD resizes every image to 320x320 whatever its size, so the input stays at that size.
    """
    torch.manual_seed(SEED)
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    return _detector("ssdlite320_mobilenet_v3_large", model, side)


def maskrcnn_resnet50_fpn_v2(side: int = 128) -> WholeModel:
    """torchvision's Mask R-CNN v2: BatchNorm in the backbone, the box head and the mask head."""
    torch.manual_seed(SEED)
    model = detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **_small(side))
    return _detector("maskrcnn_resnet50_fpn_v2", model, side)


def deeplabv3_mobilenet_v3_large(side: int = 96) -> WholeModel:
    """torchvision's DeepLabV3 with a MobileNetV3-Large backbone; the output is ``{"out": ...}``."""
    torch.manual_seed(SEED)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
    return _whole("deeplabv3_mobilenet_v3_large", model, (_image(side, SEED),))


def lraspp_mobilenet_v3_large(side: int = 96) -> WholeModel:
    """torchvision's LR-ASPP with a MobileNetV3-Large backbone; the output is ``{"out": ...}``."""
    torch.manual_seed(SEED)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    return _whole("lraspp_mobilenet_v3_large", model, (_image(side, SEED),))


# Detectors as fine-tuned from pretrained weights: torchvision then builds the backbone with FrozenBatchNorm2d
# (`norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d` in torchvision/models/detection/*.py). The
# builders below take the same path without loading weights.


def _frozen_resnet_fpn(depth: int, **fpn: Any) -> nn.Module:
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    return detection.backbone_utils._resnet_fpn_extractor(resnet, 3, **fpn)


def fasterrcnn_resnet18_fpn_frozen(side: int = 128) -> WholeModel:
    """Faster R-CNN with a ResNet-18 FPN backbone whose norms are FrozenBatchNorm2d (20 of them)."""
    torch.manual_seed(SEED)
    model = detection.FasterRCNN(_frozen_resnet_fpn(18), num_classes=5, **_small(side))
    return _detector("fasterrcnn_resnet18_fpn_frozen", model, side)


def fasterrcnn_resnet50_fpn_frozen(side: int = 128) -> WholeModel:
    """``fasterrcnn_resnet50_fpn`` as built for pretrained weights: a FrozenBatchNorm2d ResNet-50 FPN backbone."""
    torch.manual_seed(SEED)
    model = detection.FasterRCNN(_frozen_resnet_fpn(50), num_classes=91, **_small(side))
    return _detector("fasterrcnn_resnet50_fpn_frozen", model, side)


def fasterrcnn_mobilenet_v3_large_fpn_frozen(side: int = 160) -> WholeModel:
    """``fasterrcnn_mobilenet_v3_large_fpn`` as built for pretrained weights (FrozenBatchNorm2d backbone)."""
    torch.manual_seed(SEED)
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = detection.backbone_utils._mobilenet_extractor(mobilenet, True, 3)
    anchor_sizes = ((32, 64, 128, 256, 512),) * 3
    anchors = detection.anchor_utils.AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    model = detection.FasterRCNN(backbone, num_classes=91, rpn_anchor_generator=anchors, **_small(side))
    return _detector("fasterrcnn_mobilenet_v3_large_fpn_frozen", model, side)


def retinanet_resnet50_fpn_frozen(side: int = 128) -> WholeModel:
    """``retinanet_resnet50_fpn`` as built for pretrained weights (FrozenBatchNorm2d backbone)."""
    torch.manual_seed(SEED)
    extra = detection.retinanet.LastLevelP6P7(256, 256)
    backbone = _frozen_resnet_fpn(50, returned_layers=[2, 3, 4], extra_blocks=extra)
    model = detection.RetinaNet(backbone, num_classes=91, **_small(side, False))
    return _detector("retinanet_resnet50_fpn_frozen", model, side)


def maskrcnn_resnet50_fpn_frozen(side: int = 128) -> WholeModel:
    """``maskrcnn_resnet50_fpn`` as built for pretrained weights (FrozenBatchNorm2d backbone)."""
    torch.manual_seed(SEED)
    model = detection.MaskRCNN(_frozen_resnet_fpn(50), num_classes=91, **_small(side))
    return _detector("maskrcnn_resnet50_fpn_frozen", model, side)


# ----------------------------------------------------------------------------------------------- ultralytics


def _ultralytics_tasks() -> Any:
    # Read at import: no network check (is_online) and no banner or model summary on stdout.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.nn import tasks

    return tasks


def _yolo(name: str, cls_name: str, cfg: str, side: int) -> WholeModel:
    tasks = _ultralytics_tasks()
    torch.manual_seed(SEED)
    model = getattr(tasks, cls_name)(cfg, verbose=False)
    return _whole(name, model, (_image(side, SEED),))


def yolo11n_detect(side: int = 160) -> WholeModel:
    """ultralytics YOLO11n detection from its yaml; eval outputs (decoded boxes, raw head maps) have fixed shapes."""
    return _yolo("yolo11n_detect", "DetectionModel", "yolo11n.yaml", side)


def yolo11n_segment(side: int = 160) -> WholeModel:
    """ultralytics YOLO11n segmentation from its yaml."""
    return _yolo("yolo11n_segment", "SegmentationModel", "yolo11n-seg.yaml", side)


def yolo11n_classify(side: int = 96) -> WholeModel:
    """ultralytics YOLO11n classification from its yaml."""
    return _yolo("yolo11n_classify", "ClassificationModel", "yolo11n-cls.yaml", side)


# ------------------------------------------------------------------------------------------------ Hugging Face


def hf_resnet(side: int = 64) -> WholeModel:
    """Hugging Face ``ResNetForImageClassification`` with a small config (narrow stages, 1-2 blocks each)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(SEED)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10)
    return _whole("hf_resnet", ResNetForImageClassification(config), (_image(side, SEED, batch=2),))


def hf_efficientnet(side: int = 64) -> WholeModel:
    """Hugging Face ``EfficientNetForImageClassification`` with B0's layout, and its ``top_bn`` after the encoder."""
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    torch.manual_seed(SEED)
    # The default config is B7; B0's coefficients (``hidden_dim`` is the width of ``top_bn``, 1280 at width 1).
    config = EfficientNetConfig(
        image_size=side, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, num_labels=10
    )
    return _whole("hf_efficientnet", EfficientNetForImageClassification(config), (_image(side, SEED, batch=2),))


def hf_mobilenet_v2(side: int = 64) -> WholeModel:
    """Hugging Face ``MobileNetV2ForImageClassification`` (52 BatchNorms; TF padding computed on sizes)."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(SEED)
    config = MobileNetV2Config(image_size=side, depth_multiplier=0.35, num_labels=10)
    return _whole("hf_mobilenet_v2", MobileNetV2ForImageClassification(config), (_image(side, SEED, batch=2),))


# ------------------------------------------------------------------------------ segmentation_models_pytorch, timm


def smp_unet(side: int = 64) -> WholeModel:
    """segmentation_models_pytorch ``Unet`` with a ResNet-18 encoder, ``encoder_weights=None``."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(SEED)
    model = smp.Unet("resnet18", encoder_weights=None, classes=3)
    return _whole("smp_unet", model, (_image(side, SEED),))


def smp_unetplusplus(side: int = 64) -> WholeModel:
    """segmentation_models_pytorch ``UnetPlusPlus`` with a ResNet-18 encoder, ``encoder_weights=None``."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(SEED)
    model = smp.UnetPlusPlus("resnet18", encoder_weights=None, classes=3)
    return _whole("smp_unetplusplus", model, (_image(side, SEED),))


def smp_fpn_efficientnet_b0(side: int = 64) -> WholeModel:
    """segmentation_models_pytorch ``FPN`` with an efficientnet-b0 encoder (TF-"same" padded convolutions)."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(SEED)
    model = smp.FPN("efficientnet-b0", encoder_weights=None, classes=3)
    return _whole("smp_fpn_efficientnet_b0", model, (_image(side, SEED),))


def timm_efficientnet_b0_features(side: int = 64) -> WholeModel:
    """timm ``efficientnet_b0`` with ``features_only=True`` (a list of five feature maps)."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model("efficientnet_b0", pretrained=False, features_only=True)
    return _whole("timm_efficientnet_b0_features", model, (_image(side, SEED, batch=2),))


def timm_tf_efficientnet_b0(side: int = 64) -> WholeModel:
    """timm ``tf_efficientnet_b0`` (``Conv2dSame`` layers: TF-"same" padding computed from the input size)."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False)
    return _whole("timm_tf_efficientnet_b0", model, (_image(side, SEED, batch=2),))


BUILDERS: dict[str, Callable[..., WholeModel]] = {
    builder.__name__: builder
    for builder in (
        fasterrcnn_mobilenet_v3_large_320_fpn,
        fasterrcnn_resnet50_fpn_v2,
        retinanet_resnet50_fpn,
        ssdlite320_mobilenet_v3_large,
        maskrcnn_resnet50_fpn_v2,
        deeplabv3_mobilenet_v3_large,
        lraspp_mobilenet_v3_large,
        fasterrcnn_resnet18_fpn_frozen,
        fasterrcnn_resnet50_fpn_frozen,
        fasterrcnn_mobilenet_v3_large_fpn_frozen,
        retinanet_resnet50_fpn_frozen,
        maskrcnn_resnet50_fpn_frozen,
        yolo11n_detect,
        yolo11n_segment,
        yolo11n_classify,
        hf_resnet,
        hf_efficientnet,
        hf_mobilenet_v2,
        smp_unet,
        smp_unetplusplus,
        smp_fpn_efficientnet_b0,
        timm_efficientnet_b0_features,
        timm_tf_efficientnet_b0,
    )
}
"""Every whole model, name -> builder."""

# A detector (its parts compared; its FrozenBatchNorm2d backbone the cheapest) and a model returning a ModelOutput.
FAST = ("fasterrcnn_resnet18_fpn_frozen", "hf_resnet")
"""Whole models cheap enough to fuse in the default test suite (a few seconds each)."""

ULTRALYTICS = ("yolo11n_detect", "yolo11n_segment", "yolo11n_classify")
"""The ultralytics models, which have their own ``fuse()``."""


DEPLOY_SIDES: dict[str, int] = {
    # torchvision detectors: the mobilenet ones at the 320 they are named for, the ResNet-50 ones at 640 (their
    # transform resizes to min_size..max_size, set to the side); SSDlite resizes to 320 whatever it gets.
    **dict.fromkeys(("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn_frozen"), 320),
    **dict.fromkeys(
        (
            "fasterrcnn_resnet50_fpn_v2",
            "retinanet_resnet50_fpn",
            "maskrcnn_resnet50_fpn_v2",
            "fasterrcnn_resnet18_fpn_frozen",
            "fasterrcnn_resnet50_fpn_frozen",
            "retinanet_resnet50_fpn_frozen",
            "maskrcnn_resnet50_fpn_frozen",
        ),
        640,
    ),
    "ssdlite320_mobilenet_v3_large": 320,
    # segmenters: torchvision's reference evaluation resizes to 520; smp needs a multiple of 32.
    "deeplabv3_mobilenet_v3_large": 520,
    "lraspp_mobilenet_v3_large": 520,
    **dict.fromkeys(("smp_unet", "smp_unetplusplus", "smp_fpn_efficientnet_b0"), 512),
    # YOLO at ultralytics' default imgsz; its classifier at 224
    "yolo11n_detect": 640,
    "yolo11n_segment": 640,
    "yolo11n_classify": 224,
    # image classifiers (and timm's feature extractor) at 224
    **dict.fromkeys(
        ("hf_resnet", "hf_efficientnet", "hf_mobilenet_v2", "timm_efficientnet_b0_features", "timm_tf_efficientnet_b0"),
        224,
    ),
}
"""The image side each whole model is deployed at: what a user fuses with. Only the input grows: the detectors keep
the builders' small proposal and detection counts, and the Hugging Face ResNet its narrow config."""


def build(name: str, side: int | None = None) -> WholeModel:
    """Build the whole model registered as ``name``, on images of ``side`` pixels (the builder's small default when
    ``None``; :data:`DEPLOY_SIDES` holds the deployed ones).

    Raises:
        ValueError: if ``name`` is not in :data:`BUILDERS`, or ``side`` is below 32.

    Example:
        >>> build("hf_resnet").model.training
        False
    """
    if name not in BUILDERS:
        raise ValueError(f"whole_models.build({name!r}): no such model; choose one of {sorted(BUILDERS)}.")
    if side is None:
        return BUILDERS[name]()
    if side < 32:
        raise ValueError(
            f"whole_models.build({name!r}, side={side}): expected a side of at least 32 pixels (the networks "
            "downsample by up to 32); pass e.g. side=DEPLOY_SIDES[name]."
        )
    return BUILDERS[name](side)

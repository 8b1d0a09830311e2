"""Verification that survives post-processing: outputs of any magnitude compared relative to their scale, box
counts changed by rounding judged by the task metric, the continuous parts (sub-module outputs) compared."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

import fx_lightning
from fx_lightning.verify.verifier import Verifier, capture_parts, verify

pytest.importorskip("pycocotools")  # MeanAveragePrecision's backend, installed by the test extra


def randomize_batch_norm(net: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return net.eval()


class ThresholdDetector(nn.Module):
    """A detector in torchvision's output form: one box per score-map cell, kept when its score reaches
    ``threshold``. A threshold that sits exactly on a score makes the box count hang on float rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 1, 1))
        self.threshold = 0.5

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        scores = self.head(self.backbone(x)).sigmoid().flatten(1)
        side = x.shape[-1]
        cells = torch.arange(scores.shape[1], dtype=torch.float32)
        corner = torch.stack([cells % side, cells // side], 1) * 4
        boxes = torch.cat([corner, corner + 4], 1)
        out = []
        for image_scores in scores:
            keep = image_scores >= self.threshold
            labels = torch.ones(int(keep.sum()), dtype=torch.int64)
            out.append({"boxes": boxes[keep], "scores": image_scores[keep], "labels": labels})
        return out


def detection_case() -> tuple[ThresholdDetector, nn.Module, list[tuple[Tensor, list[dict[str, Tensor]]]]]:
    """The original, a fused copy nudged by a rounding-sized shift so that one box falls below the threshold, and
    one batch whose targets match each image's best box (the box that drops is a false positive either way)."""
    torch.manual_seed(0)
    net = randomize_batch_norm(ThresholdDetector())
    x = torch.rand(2, 3, 6, 6)
    fused = fx_lightning.fuse(net, (x,))
    with torch.no_grad():
        fused.head[0].bias -= 1e-6  # every score a little lower, far below any tolerance
        net.threshold = fused.threshold = 0.0
        before, after = net(x)[0]["scores"], fused(x)[0]["scores"]
        # the threshold sits exactly on a score (below the best) that the nudge lowers
        order = before.argsort(descending=True)
        dropped = next(int(i) for i in order[1:] if after[i] < before[i])
        net.threshold = fused.threshold = float(before[dropped])
        targets = []
        for detections in net(x):
            best = detections["boxes"][detections["scores"].argmax()]
            targets.append({"boxes": best[None], "labels": torch.ones(1, dtype=torch.int64)})
    return net, fused, [(x, targets)]


def test_verify_detections_whose_box_count_changes_by_rounding_pass_with_mean_average_precision() -> None:
    net, fused, batches = detection_case()
    x = batches[0][0]
    with torch.no_grad():
        counts = [len(d["boxes"]) for d in net(x)], [len(d["boxes"]) for d in fused(x)]
    assert counts[0] != counts[1]  # one box fell below the threshold: the outputs vary in shape
    result = verify(net, fused, batches, metric=MeanAveragePrecision())
    assert result.passed
    assert result.metric_original["MeanAveragePrecision.map"] == result.metric_fused["MeanAveragePrecision.map"]
    assert "[0]['boxes']" in result.varying
    assert result.num_samples == 2
    # the continuous parts were compared on the same batch, and are reported as such
    assert result.parts == ["backbone", "head"]
    assert result.parts_max_rel_diff is not None
    assert result.parts_max_rel_diff < 1e-4
    assert any("verdict comes from the task metric" in note for note in result.notes)
    assert "continuous parts compared: backbone, head" in result.compared


def test_verify_detections_without_metric_judged_by_the_continuous_parts() -> None:
    net, fused, batches = detection_case()
    images = [x for x, _ in batches]  # no targets: no metric
    assert verify(net, fused, images).passed
    broken = copy.deepcopy(fused)
    with torch.no_grad():
        broken.backbone[0].bias += 1.0  # a real error before the post-processing
    result = verify(net, broken, images)
    assert result.varying  # more boxes pass the threshold: the parts judge
    assert not result.passed
    assert result.parts_max_rel_diff is not None
    assert result.parts_max_rel_diff > 1e-3


def test_verify_post_processed_outputs_without_parts_or_metric_fail_with_the_fix() -> None:
    net, fused, batches = detection_case()
    images = [x for x, _ in batches]
    result = verify(lambda x: net(x), lambda x: fused(x), images)  # functions: no sub-modules to compare
    assert not result.passed
    assert any("pass metric=... (e.g. MeanAveragePrecision() for detections)" in n for n in result.notes)


class HugeHead(nn.Module):
    """Raw head outputs of magnitude ~1e7, as detection heads before decoding give (YOLO's)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raw = self.body(x) * 1e7
        return raw.sigmoid(), raw


def test_verify_outputs_of_magnitude_1e7_within_relative_tolerance_and_a_real_error_fails() -> None:
    torch.manual_seed(0)
    net = randomize_batch_norm(HugeHead())
    images = [torch.rand(4, 3, 12, 12) for _ in range(2)]
    fused = fx_lightning.fuse(net, (images[0],))
    result = verify(net, fused, images)
    assert result.passed
    # float32 rounding at this scale is far above any absolute 1e-3, and tiny relative to the outputs
    assert result.max_abs_diff > 1e-3
    assert result.max_rel_diff < 1e-5
    shifted = verify(net, lambda x: tuple(t * 1.01 for t in fused(x)), images)
    assert not shifted.passed
    assert shifted.max_rel_diff == pytest.approx(0.01, rel=1e-3)
    assert "relative to each output's scale" in " ".join(shifted.notes)


def test_verifier_counts_the_batch_not_a_list_of_outputs() -> None:
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()

    def five_maps(x: Tensor) -> list[Tensor]:
        y = features(x)
        return [y, y, y, y, y]

    verifier = Verifier()
    verifier.update(five_maps, five_maps, torch.rand(2, 3, 8, 8))
    assert verifier.compute().num_samples == 2


def test_capture_parts_skips_fold_sites_and_grandchildren_of_called_children() -> None:
    net = ThresholdDetector().eval()
    with torch.no_grad(), capture_parts(net) as seen:
        net(torch.rand(1, 3, 4, 4))
    assert sorted(seen) == ["backbone", "head"]  # not backbone.0 (a conv) nor head.0

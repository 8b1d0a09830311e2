"""The verdict on detections whose exact score ties are broken differently: a task metric that moves only because
another tied anchor was kept passes, and says so; a wrong untied box, or ties from the very top, fail with why."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import batched_nms

from fx_lightning.verify.verifier import Verifier

pytest.importorskip("pycocotools")  # MeanAveragePrecision's backend, installed by the test extra


class AnchorDetector(nn.Module):
    """Torchvision's post-processing in small: one anchor per cell of the input (a box twice the cell's size, so
    neighbours overlap), two classes scored by a 1x1 conv, per-image top-k, then ``batched_nms``. Anchors that see
    identical pixels get exactly identical scores. ``order`` lists the anchors in another order: the same network,
    whose top-k and NMS then break exact ties another way."""

    def __init__(self, order: Tensor | None = None, k: int = 20) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([1.0, 0.4])[:, None, None, None].expand(2, 3, 1, 1) / 3)
            self.head.bias.zero_()
        self.order = order
        self.k = k

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        scores = self.head(x).sigmoid().flatten(2)  # (N, classes, cells)
        height, width = x.shape[-2:]
        cells = torch.arange(height * width)
        corner = torch.stack([cells % width, cells // width], 1).float() * 4
        boxes = torch.cat([corner, corner + 8], 1)
        if self.order is not None:
            boxes, scores = boxes[self.order], scores[:, :, self.order]
        out = []
        for image_scores in scores:
            top, index = image_scores.flatten().topk(self.k)  # class-major: index // cells is the class
            labels, anchors = index // len(cells) + 1, index % len(cells)
            keep = batched_nms(boxes[anchors], top, labels, 0.3)
            out.append({"boxes": boxes[anchors][keep], "scores": top[keep], "labels": labels[keep]})
        return out


def images(bright: bool) -> Tensor:
    """Four uniform 8 x 8 images; with ``bright``, one brighter cell each (a different one), an untied top score."""
    x = torch.full((4, 3, 8, 8), 0.5)
    if bright:
        for i, (row, col) in enumerate([(1, 1), (2, 5), (6, 2), (5, 6)]):
            x[i, :, row, col] = 1.0
    return x


def networks() -> tuple[AnchorDetector, AnchorDetector]:
    original = AnchorDetector().eval()
    permuted = AnchorDetector(order=torch.randperm(64, generator=torch.Generator().manual_seed(0))).eval()
    permuted.load_state_dict(original.state_dict())
    return original, permuted


def batches(original: nn.Module, bright: bool) -> list[tuple[Tensor, list[dict[str, Tensor]]]]:
    """Two batches of two images, the targets the original's own detections (its mAP is 1)."""
    x = images(bright)
    with torch.no_grad():
        targets = [{"boxes": d["boxes"], "labels": d["labels"]} for d in original(x)]
    return [(x[:2], targets[:2]), (x[2:], targets[2:])]


def verdict(original: Any, candidate: Any, data: list[Any]) -> Any:
    verifier = Verifier(MeanAveragePrecision(), tolerance=1e-3)
    for batch in data:
        verifier.update(original, candidate, batch)
    return verifier.compute()


def test_verifier_detections_whose_ties_break_otherwise_pass_and_say_so() -> None:
    original, permuted = networks()
    data = batches(original, bright=True)
    with torch.no_grad():
        ours, theirs = original(data[0][0]), permuted(data[0][0])
    # the preconditions: the same scores, another selection among the tied anchors
    assert torch.equal(ours[0]["scores"][:1], theirs[0]["scores"][:1])
    assert {tuple(b.tolist()) for b in ours[0]["boxes"]} != {tuple(b.tolist()) for b in theirs[0]["boxes"]}
    result = verdict(original, permuted, data)
    assert max(result.metric_diff.values()) > 1e-3  # the metric alone would fail it
    assert result.passed
    assert result.detections is not None
    assert result.detections.explains_all
    assert result.detections.images == 4
    assert result.detections.agreed == 4  # the bright cell's box, above the tie, in every image
    assert result.ties.startswith("MeanAveragePrecision.")
    explanation = (
        "the two networks broke exact score ties differently; detections agree down to the first tie in every image "
        "(4 of "
    )
    assert explanation in result.ties
    assert result.ties in result.notes
    assert "detections: 4 of" in str(result)


def test_verifier_detections_with_a_wrong_untied_top_box_fail_with_the_reason() -> None:
    original, permuted = networks()
    data = batches(original, bright=True)

    def wrong_top(x: Tensor) -> list[dict[str, Tensor]]:
        out = permuted(x)  # the first image of each batch gets a wrong top box
        first = out[0]["scores"].argmax()
        out[0]["boxes"][first] += 2.0  # a box moved by two pixels ...
        out[0]["scores"][first] += 0.02  # ... and scored higher: nothing else has that score
        return out

    result = verdict(original, wrong_top, data)
    assert max(result.metric_diff.values()) > 1e-3
    assert not result.passed
    assert result.detections is not None
    assert not result.detections.explains_all
    assert (result.detections.differing, result.detections.explained) == (4, 2)
    assert "2 of the 4 images whose detections differ are not explained by score ties" in result.ties
    assert "batch 0, image 0: the detections part at score" in result.ties
    assert "a real mismatch, not a tie" in result.ties


def test_verifier_detections_tied_from_the_top_are_not_verified() -> None:
    original, permuted = networks()
    data = batches(original, bright=False)  # uniform images: every anchor of a class scores alike
    result = verdict(original, permuted, data)
    assert max(result.metric_diff.values()) > 1e-3
    assert not result.passed
    assert result.detections is not None
    assert result.detections.agreed == 0
    assert "nothing agreed above the tie, so these detections are not verified (everything is tied from the top)" in (
        result.ties
    )


def test_verifier_detections_that_agree_keep_the_metric_verdict_without_a_tie_note() -> None:
    original, _ = networks()
    data = batches(original, bright=True)
    result = verdict(original, original, data)
    assert result.passed
    assert result.ties == ""
    assert result.detections is not None
    assert result.detections.differing == 0
    assert result.detections.agreed == result.detections.total > 0


def test_verifier_negative_tolerance_never_passes_even_where_ties_explain_the_detections() -> None:
    original, permuted = networks()
    verifier = Verifier(MeanAveragePrecision(), tolerance=-1.0)
    for batch in batches(original, bright=True):
        verifier.update(original, permuted, batch)
    result = verifier.compute()
    assert result.detections is not None
    assert result.detections.explains_all
    assert not result.passed
    assert result.ties == ""

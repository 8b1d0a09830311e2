"""compare_detections: detections agree in score order down to the first tied score level where they part; below it
they may differ, above it (or at an untied score) a difference is a real mismatch."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fx_lightning.verify.detections import DetectionAgreement, ImageAgreement, compare_detections, is_detections


def box(x: float) -> list[float]:
    return [x, 0.0, x + 4.0, 4.0]


def image(xs: list[float], scores: list[float], labels: list[int] | None = None) -> dict[str, Tensor]:
    return {
        "boxes": torch.tensor([box(x) for x in xs]).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels if labels is not None else [1] * len(xs), dtype=torch.int64),
    }


def one(reference: dict[str, Tensor], candidate: dict[str, Tensor], rtol: float = 1e-3) -> ImageAgreement:
    return compare_detections([reference], [candidate], rtol=rtol)[0]


def test_compare_detections_equal_lists_agree_in_any_order_within_a_tie() -> None:
    reference = image([0, 8, 16, 24], [0.9, 0.5, 0.5, 0.2])
    shuffled = image([24, 16, 0, 8], [0.2, 0.5, 0.9, 0.5])  # listed in another order, the tied pair swapped
    result = one(reference, shuffled)
    assert result.agrees
    assert result.agreed == 4
    assert not result.explained
    assert result.reason() == ""


def test_compare_detections_rounding_within_rtol_agrees() -> None:
    reference = image([0, 8], [0.9, 0.4])
    nudged = image([0.001, 8], [0.9 + 1e-5, 0.4 - 1e-5])
    assert one(reference, nudged).agrees
    assert not one(reference, nudged, rtol=1e-7).agrees


def test_compare_detections_parting_at_a_tied_level_below_an_agreeing_top_is_explained() -> None:
    reference = image([0, 8, 16, 24, 40], [0.9, 0.5, 0.5, 0.5, 0.3])
    other_tie_break = image([0, 16, 32, 48], [0.9, 0.5, 0.5, 0.1])  # kept another tied box, so a neighbour went
    result = one(reference, other_tie_break)
    assert not result.agrees
    assert result.explained
    assert result.agreed == 1  # the top, above the tie
    assert result.divergence == pytest.approx(0.5)
    assert result.tied >= 2


def test_compare_detections_tie_at_the_selection_boundary_is_explained() -> None:
    # one box in each list at the same score, different boxes: both anchors scored 0.5, each kept another
    reference = image([0, 8, 40], [0.9, 0.7, 0.5])
    candidate = image([0, 8, 48], [0.9, 0.7, 0.5])
    result = one(reference, candidate)
    assert result.explained
    assert result.agreed == 2
    # another label at that score does not compete with it: a real mismatch
    relabelled = image([0, 8, 48], [0.9, 0.7, 0.5], [1, 1, 2])
    assert not one(reference, relabelled).explained


@pytest.mark.parametrize(
    "candidate",
    [
        image([2, 8, 16], [0.95, 0.5, 0.5]),  # a wrong top box, scored above the reference's top
        image([8, 16], [0.5, 0.5]),  # the top box missing
        image([0, 8, 16], [0.9, 0.5, 0.5], [2, 1, 1]),  # the top box with another label
    ],
    ids=["wrong-box", "missing", "wrong-label"],
)
def test_compare_detections_wrong_untied_top_is_a_real_mismatch(candidate: dict[str, Tensor]) -> None:
    reference = image([0, 8, 16], [0.9, 0.5, 0.5])
    result = one(reference, candidate)
    assert not result.agrees
    assert not result.explained
    assert result.tied < 2
    assert result.agreed == 0
    assert "no other detection competes at that score: a real mismatch, not a tie" in result.reason()


def test_compare_detections_wrong_untied_box_below_a_tie_is_a_real_mismatch() -> None:
    reference = image([0, 8, 16, 40], [0.9, 0.5, 0.5, 0.3])
    candidate = image([0, 8, 16, 44], [0.9, 0.5, 0.5, 0.25])
    result = one(reference, candidate)
    assert not result.explained
    assert result.divergence == pytest.approx(0.3)
    assert result.agreed == 3
    assert "a real mismatch" in result.reason()


def test_compare_detections_everything_tied_from_the_top_is_not_verified() -> None:
    reference = image([0, 8, 16], [0.5, 0.5, 0.5])
    candidate = image([0, 12, 20], [0.5, 0.5, 0.5])
    result = one(reference, candidate)
    assert not result.agrees
    assert result.tied >= 2
    assert result.agreed == 0
    assert not result.explained
    assert "the top score level (best score 0.5), where 5 detections compete: nothing agreed above the tie, so" in (
        result.reason()
    )


def test_compare_detections_no_detections_on_either_side() -> None:
    empty = image([], [])
    assert one(empty, empty).agrees
    result = one(empty, image([0], [0.9]))
    assert not result.agrees
    assert not result.explained


def test_detection_agreement_counts_images_and_keeps_the_first_reasons() -> None:
    reference = image([0, 8, 16], [0.9, 0.5, 0.5])
    agreement = DetectionAgreement()
    agreement.add(one(reference, reference), "batch 0, image 0")
    agreement.add(one(reference, image([0, 12, 20], [0.9, 0.5, 0.5])), "batch 0, image 1")
    assert agreement.explains_all
    assert (agreement.images, agreement.differing, agreement.explained) == (2, 1, 1)
    assert (agreement.agreed, agreement.total) == (4, 6)
    for i in range(5):
        agreement.add(one(reference, image([2], [0.95])), f"batch 1, image {i}")
    assert not agreement.explains_all
    assert len(agreement.failures) == DetectionAgreement.KEEP
    assert agreement.failures[0].startswith("batch 1, image 0: the detections part at score 0.95 (0 of the reference")
    assert "6 of 7 images differ, 1 of them explained by a tie" in agreement.describe()


def test_is_detections_accepts_torchvision_form_only() -> None:
    assert is_detections([image([0], [0.9])])
    assert not is_detections([{"boxes": torch.zeros(1, 4), "scores": torch.zeros(1)}])
    assert not is_detections(torch.zeros(2, 4))
    assert not is_detections([])


def test_compare_detections_rejects_other_outputs_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"compare_detections\(reference=\.\.\.\) expects a list of dicts .* got "):
        compare_detections(torch.zeros(2, 4), [image([0], [0.9])], rtol=1e-3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got detections for 1 images as reference and 2 as candidate; pass both"):
        compare_detections([image([0], [0.9])], [image([0], [0.9])] * 2, rtol=1e-3)

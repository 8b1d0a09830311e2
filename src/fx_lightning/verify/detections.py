"""Detections compared in score order, where two runtimes may break exact score ties differently.

A detector's post-processing (per-class top-k, then non-maximum suppression, then the best ``detections_per_img``)
selects among anchors by score. Anchors that see identical pixels (a uniform background, an untrained network's
bias) get identical scores, and which of two exactly tied anchors top-k keeps, or which NMS visits first and lets
suppress the other, is an implementation choice: torch and ONNX Runtime choose differently. Both selections are
correct; they are simply different, and from the first tied score where they part, everything below may differ
too (a different box suppressed a different neighbour). A task metric such as mAP then moves, although nothing
was computed wrongly.

:func:`compare_detections` tells that case apart from a real error: per image, the two lists must agree in score
order down to the first score level that is tied and where they part; a divergence at an untied score is a real
mismatch, and a divergence at the very top (nothing agreed before it) proves nothing, so it is not verified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fx_lightning.verify.compare import default_rtol

__all__ = ["DetectionAgreement", "ImageAgreement", "compare_detections", "is_detections"]

DETECTION_KEYS = ("boxes", "scores", "labels")


def is_detections(value: Any) -> bool:
    """Whether ``value`` is a non-empty list/tuple of dicts holding ``boxes``, ``scores`` and ``labels`` tensors
    (torchvision's detection output form).

    Example:
        >>> is_detections([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}])
        True
        >>> is_detections([{"boxes": torch.zeros(0, 4)}]), is_detections([])
        (False, False)
    """
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(v, Mapping) and all(isinstance(v.get(k), Tensor) for k in DETECTION_KEYS) for v in value)
    )


@dataclass(frozen=True)
class ImageAgreement:
    """How one image's candidate detections agree with the reference's (see :func:`compare_detections`).

    Attributes:
        reference: the reference's detection count.
        candidate: the candidate's detection count.
        agreed: the reference detections, in score order, that the candidate matches before the two part (all of
            them when the lists agree).
        divergence: the score at which the two part (the higher of the first unmatched detection on either side),
            or ``None`` when they agree throughout.
        tied: how many detections share the score level of ``divergence`` (scores within rounding of it): the
            larger count of the two lists, or 2 when each list holds one there and they differ (a tie at the
            selection boundary); two or more make the divergence a tie.
        top: the reference's best score (``nan`` without detections), to say how far from the top it parted.
    """

    reference: int
    candidate: int
    agreed: int
    divergence: float | None = None
    tied: int = 0
    top: float = math.nan

    @property
    def agrees(self) -> bool:
        """The two lists hold the same detections."""
        return self.divergence is None

    @property
    def explained(self) -> bool:
        """They part at a tied score level, after at least one detection agreed."""
        return not self.agrees and self.tied >= 2 and self.agreed > 0

    def reason(self) -> str:
        """Why the image is not verified ("" when it agrees or its divergence is explained by a tie)."""
        if self.agrees or self.explained:
            return ""
        where = (
            f"the detections part at score {self.divergence:.9g} after {self.agreed} of {self.reference} agreed "
            f"(the candidate has {self.candidate})"
        )
        if self.tied < 2:
            return f"{where}, and no other detection has that score: a real mismatch, not a tie"
        return (
            f"{where}: the top score level (score {self.top:.9g}) is already tied and differs, so nothing agreed "
            "before the tie and the detections are not verified; check on images where the top score is not tied"
        )


@dataclass
class DetectionAgreement:
    """Tie-aware agreement of detections over many images (see :func:`compare_detections`).

    Attributes:
        images: images compared.
        differing: images whose detections differ.
        explained: differing images that part at a tied score level after at least one agreeing detection.
        agreed: reference detections in the agreeing part of every image (the whole list where they agree).
        total: reference detections over every image.
        failures: why differing images are not explained (the first few).
    """

    images: int = 0
    differing: int = 0
    explained: int = 0
    agreed: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)

    #: How many failure reasons are kept.
    KEEP = 3

    @property
    def explains_all(self) -> bool:
        """Some image differs, and every differing image is explained by a tie."""
        return self.differing > 0 and self.explained == self.differing

    def add(self, image: ImageAgreement, where: str = "") -> None:
        """Count one image; ``where`` names it in a failure reason (e.g. ``"batch 0, image 1"``)."""
        self.images += 1
        self.total += image.reference
        self.agreed += image.agreed
        if image.agrees:
            return
        self.differing += 1
        if image.explained:
            self.explained += 1
        elif len(self.failures) < self.KEEP:
            self.failures.append(f"{where}: {image.reason()}" if where else image.reason())

    def describe(self) -> str:
        """One phrase: what agreed, over how many images."""
        return (
            f"{self.agreed} of {self.total} detections agree in score order before the first tie; "
            f"{self.differing} of {self.images} images differ, {self.explained} of them at a tied score level"
        )


def compare_detections(
    reference: Sequence[Mapping[str, Tensor]],
    candidate: Sequence[Mapping[str, Tensor]],
    *,
    rtol: float,
    tie_rtol: float | None = None,
) -> list[ImageAgreement]:
    """Compare two lists of per-image detections in score order, allowing exact score ties to be broken differently.

    Per image, both lists are sorted by descending score and walked together from the top. Each reference
    detection ``r``, in turn, must be matched by a candidate detection not matched yet with the same label, every
    box coordinate within ``rtol`` times the reference's largest box coordinate, and a score within ``rtol`` times
    the reference's largest score (so the order of detections whose scores lie within that tolerance does not
    matter), and no unmatched candidate detection may score above ``r`` by more than that tolerance. The first
    reference detection without a match, or the first candidate detection above every remaining reference one
    (or left over at the end), is where the two *part*; its score ``s`` is the divergence. The level of ``s`` is
    every detection of either list whose score lies within ``tie_rtol`` times the largest reference score of
    ``s``. The divergence is:

    * *explained* (a tie) when that level holds two or more detections in one list (several anchors scored
      alike), or one in each list with different boxes (a tie at the selection boundary: both anchors had that
      score, each runtime kept another), and at least one detection agreed before it; everything below ``s`` may
      then legitimately differ and is not compared;
    * a *real mismatch* when the level holds one detection only (a box, label or score that the other list has
      nowhere near its score);
    * *not verified* when it is tied but nothing agreed before it (the top level itself is tied and differs).

    Limits: only ``boxes``, ``scores`` and ``labels`` are compared (masks and keypoints are not); detections below
    the first tie are not checked at all, so an image tied near its top says little (the agreed count says how
    much was checked); the matching is greedy (each reference detection takes the first fitting candidate in
    score order), which can report a divergence earlier than an optimal matching would, never later.

    Args:
        reference: the reference's detections, one dict per image (torchvision's form).
        candidate: the candidate's detections for the same images.
        rtol: the relative tolerance of boxes and scores (to each image's largest reference box coordinate and
            score; absolute where the reference has no detection).
        tie_rtol: how close two scores must be to count as tied, relative to the largest reference score;
            ``None`` for the rounding a float computation may leave (:func:`~fx_lightning.verify.compare.
            default_rtol` of the scores' dtype), never more than ``rtol``.

    Returns:
        One :class:`ImageAgreement` per image.

    Raises:
        ValueError: if either is not a list of detection dicts, or they cover different numbers of images.

    Example:
        >>> box = lambda x: [x, 0.0, x + 4.0, 4.0]
        >>> ref = [{"boxes": torch.tensor([box(0), box(8), box(16)]), "scores": torch.tensor([0.9, 0.5, 0.5]),
        ...         "labels": torch.tensor([1, 1, 1])}]
        >>> cand = [{"boxes": torch.tensor([box(0), box(16), box(24)]), "scores": torch.tensor([0.9, 0.5, 0.5]),
        ...          "labels": torch.tensor([1, 1, 1])}]
        >>> image = compare_detections(ref, cand, rtol=1e-3)[0]
        >>> image.agreed, image.divergence, image.tied, image.explained
        (1, 0.5, 2, True)
    """
    for name, value in (("reference", reference), ("candidate", candidate)):
        if not is_detections(value):
            raise ValueError(
                f"compare_detections({name}=...) expects a list of dicts with tensors under {list(DETECTION_KEYS)} "
                f"(torchvision's detection output), got {_outline(value)}. Pass each network's detections as "
                "returned in eval mode."
            )
    if len(reference) != len(candidate):
        raise ValueError(
            f"compare_detections() got detections for {len(reference)} images as reference and {len(candidate)} as "
            "candidate; pass both networks' outputs on the same batch."
        )
    return [_compare_image(ref, cand, rtol, tie_rtol) for ref, cand in zip(reference, candidate)]


def _compare_image(
    reference: Mapping[str, Tensor], candidate: Mapping[str, Tensor], rtol: float, tie_rtol: float | None
) -> ImageAgreement:
    ref_scores, ref_boxes, ref_labels = _sorted(reference)
    cand_scores, cand_boxes, cand_labels = _sorted(candidate)
    n_ref, n_cand = len(ref_scores), len(cand_scores)
    top = float(ref_scores[0]) if n_ref else math.nan
    score_scale = float(np.abs(ref_scores).max()) if n_ref else 0.0
    box_scale = float(np.abs(ref_boxes).max()) if ref_boxes.size else 0.0
    score_tol = rtol * score_scale if score_scale > 0 else rtol
    box_tol = rtol * box_scale if box_scale > 0 else rtol
    tie = default_rtol(reference["scores"].dtype) if tie_rtol is None else tie_rtol
    tie_tol = min(tie, rtol) * score_scale if score_scale > 0 else min(tie, rtol)
    same_width = ref_boxes.shape[1] == cand_boxes.shape[1]
    if (
        n_ref == n_cand
        and same_width
        and np.array_equal(ref_labels, cand_labels)
        and bool(np.all(np.abs(ref_scores - cand_scores) <= score_tol))
        and bool(np.all(np.abs(ref_boxes - cand_boxes) <= box_tol))
    ):
        return ImageAgreement(n_ref, n_cand, n_ref, top=top)  # the same detections in the same order

    free = np.ones(n_cand, dtype=bool)
    partner = np.full(n_ref, -1)
    divergence: float | None = None
    agreed = 0
    for i in range(n_ref):
        first_free = int(free.argmax()) if free.any() else -1
        if first_free >= 0 and cand_scores[first_free] > ref_scores[i] + score_tol:
            divergence = float(cand_scores[first_free])  # the candidate has a detection above r that r's list lacks
            break
        fits = free & (np.abs(cand_scores - ref_scores[i]) <= score_tol) & (cand_labels == ref_labels[i])
        if same_width:
            fits &= np.abs(cand_boxes - ref_boxes[i]).max(axis=1, initial=0.0) <= box_tol
        else:
            fits[:] = False
        if not fits.any():
            divergence = float(ref_scores[i])
            break
        j = int(fits.argmax())
        free[j] = False
        partner[i] = j
        agreed += 1
    else:
        if free.any():
            divergence = float(cand_scores[int(free.argmax())])
    if divergence is None:
        return ImageAgreement(n_ref, n_cand, agreed, top=top)
    in_ref = np.flatnonzero(np.abs(ref_scores - divergence) <= tie_tol)
    in_cand = np.flatnonzero(np.abs(cand_scores - divergence) <= tie_tol)
    tied = max(len(in_ref), len(in_cand))
    if len(in_ref) == 1 and len(in_cand) == 1 and partner[in_ref[0]] != in_cand[0]:
        tied = 2  # one detection in each list at that score, different ones: a tie at the selection boundary
    return ImageAgreement(n_ref, n_cand, agreed, divergence, tied, top)


def _sorted(detections: Mapping[str, Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores and boxes (float64, one box row per detection) and labels, as arrays, by descending score."""
    scores = detections["scores"].detach().cpu().to(torch.float64).reshape(-1)
    order = scores.argsort(descending=True, stable=True)
    boxes = detections["boxes"].detach().cpu().to(torch.float64).reshape(len(scores), -1)
    labels = detections["labels"].detach().cpu().reshape(-1)
    return scores[order].numpy(), boxes[order].numpy(), labels[order].numpy()


def _outline(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (list, tuple)):
        inner = f" of {_outline(value[0])}" if value else ""
        return f"a {type(value).__name__} of {len(value)}{inner}"
    return type(value).__name__

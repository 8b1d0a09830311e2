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

__all__ = ["DetectionAgreement", "ImageAgreement", "compare_detections", "is_detections"]

DETECTION_KEYS = ("boxes", "scores", "labels")


def is_detections(value: Any, keys: Sequence[str] = DETECTION_KEYS) -> bool:
    """Whether ``value`` is a non-empty list/tuple of dicts holding tensors under ``keys`` (by default ``boxes``,
    ``scores`` and ``labels``: torchvision's detection output form; its targets hold ``boxes`` and ``labels``).

    Example:
        >>> is_detections([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}])
        True
        >>> is_detections([{"boxes": torch.zeros(0, 4)}]), is_detections([])
        (False, False)
    """
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(v, Mapping) and all(isinstance(v.get(k), Tensor) for k in keys) for v in value)
    )


@dataclass(frozen=True)
class ImageAgreement:
    """How one image's candidate detections agree with the reference's (see :func:`compare_detections`).

    Attributes:
        reference: the reference's detection count.
        candidate: the candidate's detection count.
        agreed: the reference detections that the candidate matches above the score level where the two part
            (all of them when the lists agree): the part that was checked.
        divergence: the score at which the two part (of the first detection on either side without a match), or
            ``None`` when they agree throughout.
        tied: the detections competing at that score level: those of the same list within rounding of it, plus
            the other list's unmatched ones of the same label within the comparison's tolerance of it; two or more
            make the divergence a tie.
        top: the reference's best score (``nan`` without detections).
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
        """They part at a tied score level, below at least one agreeing detection."""
        return not self.agrees and self.tied >= 2 and self.agreed > 0

    def reason(self) -> str:
        """Why the image is not verified ("" when it agrees or its divergence is explained by a tie)."""
        if self.agrees or self.explained:
            return ""
        if self.tied < 2:
            return (
                f"the detections part at score {self.divergence:.7g} ({self.agreed} of the reference's "
                f"{self.reference} agree above it, the candidate has {self.candidate}), and no other detection "
                "competes at that score: a real mismatch, not a tie"
            )
        return (
            f"the detections part at score {self.divergence:.7g}, the top score level (best score {self.top:.7g}), "
            f"where {self.tied} detections compete: nothing agreed above the tie, so these detections are not "
            "verified (everything is tied from the top); verify on data whose best detections are not tied"
        )


@dataclass
class DetectionAgreement:
    """Tie-aware agreement of detections over many images (see :func:`compare_detections`).

    Attributes:
        images: images compared.
        differing: images whose detections differ.
        explained: differing images that part at a tied score level below at least one agreeing detection.
        agreed: reference detections that agree above the first tie where the lists part (the whole list where
            they agree), over every image.
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
            f"{self.agreed} of {self.total} detections agree in score order above the first tie; "
            f"{self.differing} of {self.images} images differ, {self.explained} of them explained by a tie"
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
    box coordinate within ``rtol`` times the reference's largest box coordinate and a score within ``rtol`` times
    the reference's largest score (so the order of detections whose scores lie within that tolerance does not
    matter), and no unmatched candidate detection may score above ``r`` by more than that tolerance. The first
    reference detection without a match, or the first candidate detection above every remaining reference one
    (or left over at the end), is where the two *part*; its score ``s`` is the divergence, and the detections
    checked are the reference's that score above ``s``'s level (every one of them matched). That detection is
    *tied* when another detection competes with it at ``s``: one of its own list whose score is within rounding
    of ``s`` (``tie_rtol`` times the largest reference score: several anchors scored alike, which one runtime
    computes bit for bit equal), or an unmatched one of the other list with the same label and a score within
    ``rtol`` (a tie at the selection boundary: both anchors had that score, each runtime kept another). The
    divergence is:

    * *explained* (a tie) when it is tied and at least one reference detection agreed above its level; below
      ``s`` the selections may legitimately differ (another box kept, so another neighbour suppressed) and
      nothing is compared;
    * a *real mismatch* when it is not tied (a box, label or score that the other list has nowhere near that
      score);
    * *not verified* when it is tied but nothing agreed above it: everything is tied from the top.

    Limits: only ``boxes``, ``scores`` and ``labels`` are compared (masks and keypoints are not); detections below
    the first tie are not checked at all, so an image tied near its top says little (``agreed`` says how much was
    checked); a box that moves while its score stays exactly the same looks, in the outputs alone, like a tie at
    the selection boundary; the matching is greedy (each reference detection takes the first fitting candidate in
    score order), which can report a divergence earlier than an optimal matching would, never later.

    Args:
        reference: the reference's detections, one dict per image (torchvision's form).
        candidate: the candidate's detections for the same images.
        rtol: the relative tolerance of boxes and scores (to each image's largest reference box coordinate and
            score; absolute where the reference has no detection).
        tie_rtol: how close two scores of one list must be to count as tied, relative to the largest reference
            score; ``None`` for four units of rounding of the scores' dtype (``4 * torch.finfo(dtype).eps``).

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
        (1, 0.5, 4, True)
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
    dtype = reference["scores"].dtype
    tie = (4 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0) if tie_rtol is None else tie_rtol
    tie_tol = tie * score_scale if score_scale > 0 else tie
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
    parted: tuple[str, int] | None = None  # which list holds the first detection without a match, and where
    done = 0  # reference detections matched, all from the top
    for i in range(n_ref):
        first_free = int(free.argmax()) if free.any() else -1
        if first_free >= 0 and cand_scores[first_free] > ref_scores[i] + score_tol:
            parted = ("candidate", first_free)  # a candidate detection above r that the reference lacks
            break
        fits = free & (np.abs(cand_scores - ref_scores[i]) <= score_tol) & (cand_labels == ref_labels[i])
        if same_width:
            fits &= np.abs(cand_boxes - ref_boxes[i]).max(axis=1, initial=0.0) <= box_tol
        else:
            fits[:] = False
        if not fits.any():
            parted = ("reference", i)
            break
        free[int(fits.argmax())] = False
        done += 1
    else:
        if free.any():
            parted = ("candidate", int(free.argmax()))
    if parted is None:
        return ImageAgreement(n_ref, n_cand, n_ref, top=top)
    side, index = parted
    if side == "reference":
        divergence, label = float(ref_scores[index]), ref_labels[index]
        own = int(np.sum(np.abs(ref_scores - divergence) <= tie_tol))
        rivals = free & (cand_labels == label) & (np.abs(cand_scores - divergence) <= score_tol)
    else:
        divergence, label = float(cand_scores[index]), cand_labels[index]
        own = int(np.sum(np.abs(cand_scores - divergence) <= tie_tol))
        unmatched = np.arange(n_ref) >= done
        rivals = unmatched & (ref_labels == label) & (np.abs(ref_scores - divergence) <= score_tol)
    agreed = int(np.sum(ref_scores > divergence + tie_tol))
    return ImageAgreement(n_ref, n_cand, agreed, divergence, own + int(rivals.sum()), top)


def _sorted(detections: Mapping[str, Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores and boxes (float64, one box row per detection) and labels, as arrays, by descending score."""
    scores = detections["scores"].detach().cpu().to(torch.float64).reshape(-1)
    order = scores.argsort(descending=True, stable=True)
    boxes = detections["boxes"].detach().cpu().to(torch.float64)
    boxes = boxes.reshape(len(scores), -1) if boxes.numel() else boxes.reshape(0, boxes.shape[-1] if boxes.dim() else 0)
    labels = detections["labels"].detach().cpu().reshape(-1)
    return scores[order].numpy(), boxes[order].numpy(), labels[order].numpy()


def _outline(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (list, tuple)):
        inner = f" of {_outline(value[0])}" if value else ""
        return f"a {type(value).__name__} of {len(value)}{inner}"
    return type(value).__name__

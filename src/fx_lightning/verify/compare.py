"""One comparison of two outputs of any form, relative to each output's own scale.

Every check of a fused network or of an artifact against its reference compares pytrees of tensors (a tensor,
``(logits, aux)``, a dict, a list of detection dicts, a ``ModelOutput``). :func:`compare_trees` does it once, leaf
by leaf, and measures each leaf's error relative to the magnitude of the reference leaf (its largest finite
absolute value), so that raw head outputs of magnitude 1e7 and probabilities of magnitude 1 are held to the same
relative standard. With a float64 ``exact`` reference, a leaf is also allowed the reference's own float rounding
error (twice it, plus a few units of rounding), which float64 can measure.

Leaves whose shapes differ (post-NMS detections whose box count varies) are not compared: they are listed as
``varying`` and never raise; whoever owns the verdict (the task metric) decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten_with_path

__all__ = ["Comparison", "LeafComparison", "compare_trees", "default_rtol", "relative_error"]


def default_rtol(dtype: torch.dtype) -> float:
    """The relative error a fold may leave in outputs of ``dtype``: a few hundred units of its rounding.

    Example:
        >>> default_rtol(torch.float32), default_rtol(torch.float64)
        (0.0001, 1e-10)
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    return 1e-4


@dataclass(frozen=True)
class LeafComparison:
    """One leaf of a comparison.

    Attributes:
        path: where the leaf sits in the output (``[0]['boxes']``, ``.logits``, or ``""`` for a tensor).
        max_abs: the largest absolute difference (``inf`` where NaN/inf positions or non-tensor values differ).
        scale: the largest finite absolute value of the reference leaf (0 for an empty or non-tensor leaf).
        max_rel: ``max_abs / scale`` (``max_abs`` itself when the scale is 0).
        bound: the largest relative error this leaf was allowed.
        varying: the shapes differ, so the leaf was not compared (``max_abs`` and ``max_rel`` are NaN).
        discrete: an integer or boolean tensor (labels, indices, counts), compared for equality.
    """

    path: str
    max_abs: float
    scale: float
    max_rel: float
    bound: float
    varying: bool = False
    discrete: bool = False

    @property
    def passed(self) -> bool:
        return not self.varying and self.max_rel <= self.bound


@dataclass(frozen=True)
class Comparison:
    """Two outputs compared leaf by leaf (see :func:`compare_trees`).

    Attributes:
        leaves: one entry per leaf of the reference, in order.
        structure: ``""`` when both outputs have the same structure, else what differs (nothing is compared then).
    """

    leaves: list[LeafComparison] = field(default_factory=list)
    structure: str = ""

    @property
    def compared(self) -> list[LeafComparison]:
        """The leaves of the same shape in both outputs."""
        return [leaf for leaf in self.leaves if not leaf.varying]

    @property
    def varying(self) -> list[LeafComparison]:
        """The leaves whose shapes differ (post-processed outputs such as NMS selections)."""
        return [leaf for leaf in self.leaves if leaf.varying]

    @property
    def max_abs(self) -> float:
        """The largest absolute difference over the compared leaves (0 when none was compared)."""
        if self.structure:
            return math.inf
        return max((leaf.max_abs for leaf in self.compared), default=0.0)

    @property
    def max_rel(self) -> float:
        """The largest relative difference (to each leaf's scale) over the compared leaves."""
        if self.structure:
            return math.inf
        return max((leaf.max_rel for leaf in self.compared), default=0.0)

    @property
    def passed(self) -> bool:
        """Same structure, no varying leaf, every leaf within its bound."""
        return not self.structure and all(leaf.passed for leaf in self.leaves)

    @property
    def compared_passed(self) -> bool:
        """Same structure and every leaf of the same shape within its bound (varying leaves left to a metric)."""
        return not self.structure and all(leaf.passed for leaf in self.compared)

    def worst(self) -> LeafComparison | None:
        """The compared leaf with the largest relative error relative to its bound, or ``None``."""
        leaves = self.compared
        if not leaves:
            return None
        return max(leaves, key=lambda leaf: leaf.max_rel / leaf.bound if leaf.bound > 0 else leaf.max_rel * math.inf)

    def describe(self) -> str:
        """One line: the worst leaf's figures, how many leaves were compared, which varied."""
        if self.structure:
            return self.structure
        worst = self.worst()
        parts = []
        if worst is not None:
            where = f" at output{worst.path}" if worst.path else ""
            parts.append(
                f"max rel diff {worst.max_rel:.3e}{where} (max abs diff {worst.max_abs:.3e} on a scale of "
                f"{worst.scale:.3g}, bound {worst.bound:.3g})"
            )
        parts.append(f"{len(self.compared)} of {len(self.leaves)} output leaves compared")
        if self.varying:
            names = ", ".join(f"output{leaf.path}" for leaf in self.varying[:3])
            more = f" and {len(self.varying) - 3} more" if len(self.varying) > 3 else ""
            parts.append(f"{len(self.varying)} vary in shape ({names}{more})")
        return "; ".join(parts)


def relative_error(reference: Tensor, candidate: Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` over finite reference values (see
    :func:`compare_trees` for the rules on NaN, inf and zero scale).

    Example:
        >>> relative_error(torch.tensor([1e7, -2e7]), torch.tensor([1e7 + 866.0, -2e7]))
        4.33e-05
    """
    return compare_trees(reference, candidate, rtol=math.inf).max_rel


def compare_trees(
    reference: Any,
    candidate: Any,
    *,
    rtol: float | None = None,
    exact: Any = None,
    slack: float = 2.0,
    atol: float = 0.0,
) -> Comparison:
    """Compare ``candidate`` with ``reference`` leaf by leaf, each relative to the reference leaf's scale.

    A floating leaf passes when ``max |candidate - reference| <= bound * scale``, where ``scale`` is the
    largest finite ``|reference|`` of the leaf and ``bound`` is ``rtol`` (by default :func:`default_rtol` of
    the reference's dtype). With ``exact`` (the same output computed in float64), the error is measured against
    ``exact`` and the leaf may also be off by ``slack`` times the reference's own error plus 16 units of
    rounding of its dtype: rounding that float64 can see never fails a leaf. NaN and infinite values must sit
    at the same positions with the same values. A floating leaf whose reference is all zeros has no scale: its
    largest absolute difference must stay within ``max(bound, atol)``. Integer and boolean leaves must be equal;
    other leaves (strings, numbers, ``None``) must compare equal. Leaves whose shapes differ are ``varying``: not
    compared, never an error.

    Args:
        reference: the output to match (the original network's, or the fused network's for an artifact).
        candidate: the output to check, of the same structure.
        rtol: the relative bound for every floating leaf; ``None`` for :func:`default_rtol` of each leaf's dtype.
        exact: optional float64 run of the reference computation, of the same structure.
        slack: how many times the reference's own error (against ``exact``) a leaf may be off.
        atol: the absolute bound of a floating leaf whose reference is all zeros (it has no scale to be relative to).

    Returns:
        A :class:`Comparison`; ``structure`` says what differs when the pytrees differ.

    Example:
        >>> big = torch.tensor([1e7, -3e7])
        >>> compare_trees({"raw": big}, {"raw": big + 866.0}).passed
        True
        >>> compare_trees(torch.ones(3), torch.ones(3) * 1.01).passed
        False
        >>> comparison = compare_trees([{"boxes": torch.ones(2, 4)}], [{"boxes": torch.ones(3, 4)}])
        >>> comparison.passed, comparison.compared_passed, len(comparison.varying)
        (False, True, 1)
    """
    leaves, spec = tree_flatten_with_path(reference)
    other, other_spec = tree_flatten_with_path(candidate)
    if spec != other_spec:
        return Comparison(structure=f"the outputs differ in structure: {_outline(reference)} vs {_outline(candidate)}")
    exact_leaves: Sequence[Any] = [None] * len(leaves)
    if exact is not None:
        flat_exact, exact_spec = tree_flatten_with_path(exact)
        if exact_spec != spec:
            return Comparison(structure=f"the exact reference differs in structure: {_outline(exact)}")
        exact_leaves = [leaf for _, leaf in flat_exact]
    result = [
        _leaf(_path(path), ref, cand, rtol, ex, slack, atol)
        for (path, ref), (_, cand), ex in zip(leaves, other, exact_leaves)
    ]
    return Comparison(leaves=result)


def _leaf(path: str, ref: Any, cand: Any, rtol: float | None, exact: Any, slack: float, atol: float) -> LeafComparison:
    if not isinstance(ref, Tensor) or not isinstance(cand, Tensor):
        same = isinstance(ref, Tensor) == isinstance(cand, Tensor) and _equal(ref, cand)
        return LeafComparison(path, 0.0 if same else math.inf, 0.0, 0.0 if same else math.inf, 0.0)
    if ref.shape != cand.shape:
        return LeafComparison(path, math.nan, 0.0, math.nan, 0.0, varying=True)
    if not ref.is_floating_point() and not ref.is_complex():
        same = torch.equal(ref.detach().cpu(), cand.detach().cpu().to(ref.dtype))
        return LeafComparison(path, 0.0 if same else math.inf, 0.0, 0.0 if same else math.inf, 0.0, discrete=True)
    bound = default_rtol(ref.dtype) if rtol is None else rtol
    # Differences of float32 values are computed in float32 (the difference of two close float32 values is exact,
    # of distant ones off by one rounding of the difference): float64 copies of large outputs cost more than the
    # forward that made them. With a float64 leaf or an ``exact`` reference, everything is float64.
    work = torch.promote_types(torch.promote_types(ref.dtype, cand.dtype), torch.float32)
    if exact is not None:
        work = torch.float64
    ref64 = ref.detach().cpu().to(work)
    cand64 = cand.detach().cpu().to(work)
    if ref64.numel() == 0:
        return LeafComparison(path, 0.0, 0.0, 0.0, bound)
    if bool(torch.isfinite(ref64.sum() if cand is ref else ref64.sum() + cand64.sum())):
        # Finite sums mean every value is finite (the usual case): no masks, no masked copies of large outputs.
        finite = None
        ref_f, cand_f = ref64.reshape(-1), cand64.reshape(-1)
    else:
        finite = torch.isfinite(ref64)
        same_specials = torch.equal(ref64[~finite].nan_to_num(), cand64[~finite].nan_to_num())
        if not torch.equal(finite, torch.isfinite(cand64)) or not same_specials:
            return LeafComparison(path, math.inf, 0.0, math.inf, bound)
        if not finite.any():
            return LeafComparison(path, 0.0, 0.0, 0.0, bound)
        ref_f, cand_f = ref64[finite], cand64[finite]
    scale = _max_abs(ref_f)
    if exact is not None and isinstance(exact, Tensor) and exact.shape == ref.shape:
        exact64 = exact.detach().cpu().to(torch.float64)
        exact64 = exact64.reshape(-1) if finite is None else exact64[finite]
        error = _max_abs(cand_f - exact64)
        own = _max_abs(ref_f - exact64)
        eps = torch.finfo(ref.dtype).eps
        allowed = slack * own + 16 * eps * scale
        if scale > 0:
            bound = max(bound, allowed / scale)
    else:
        error = 0.0 if cand is ref else _max_abs(cand_f - ref_f)
    if scale > 0:
        return LeafComparison(path, error, scale, error / scale, bound)
    return LeafComparison(path, error, scale, error, max(bound, atol))


def _max_abs(values: Tensor) -> float:
    """The largest ``|value|`` of a non-empty tensor, read in one pass without an ``abs()`` copy (real values)."""
    if values.is_complex():
        return float(values.abs().max())
    low, high = torch.aminmax(values)
    return max(-float(low), float(high))


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values without a truth value (arrays): compared by identity
        return a is b


def _path(keys: Sequence[Any]) -> str:
    return "".join(str(key) for key in keys)


def _outline(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_outline(v)}" for k, v in list(value.items())[:4]) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_outline(v) for v in value[:3])
        more = ", ..." if len(value) > 3 else ""
        return f"{type(value).__name__}[{inner}{more}]"
    return type(value).__name__

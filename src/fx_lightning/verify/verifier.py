"""Check that a fused network still does its job: the same task metric and (nearly) the same outputs.

:class:`Verifier` is fed batches one at a time, so it works inside a Lightning loop as well as on its own;
every quantity it keeps is a torchmetrics metric, so :meth:`Verifier.compute` returns results synchronised
across processes whenever ``torch.distributed`` is initialised. :func:`verify` runs it over an iterable.
Nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torchmetrics import MaxMetric, MeanMetric, MeanSquaredError, Metric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from fx_lightning.trees import batch_size, leading_size, like_module, tree_to
from fx_lightning.verify.compare import Comparison, compare_trees
from fx_lightning.verify.detections import DetectionAgreement, compare_detections, is_detections

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


def default_get_input(batch: Any) -> Any:
    """The network input of a batch: element 0 of a tuple/list, a known key of a dict, or a bare tensor.

    Args:
        batch: what the dataloader yields.

    Returns:
        The input to call the network with; a tuple returned here is unpacked as positional arguments. When the
        first element is itself a tuple or list (a list of images), it is returned wrapped as one argument; for a
        forward with several inputs, pass ``get_input=lambda batch: (batch[0], batch[1])``.

    Raises:
        TypeError: if the batch has none of these layouts.

    Example:
        >>> x = torch.zeros(2, 3)
        >>> default_get_input((x, torch.tensor([0, 1]))) is x, default_get_input({"image": x}) is x
        (True, True)
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        first = batch[0]
        # A sequence of inputs (the detection collate ``tuple(zip(*batch))`` yields a tuple of images) is one
        # argument, not several: wrapped, so that the tuple returned here unpacks into exactly it.
        return (first,) if isinstance(first, (tuple, list)) else first
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise TypeError(
            f"default_get_input(batch) found none of the input keys {list(INPUT_KEYS)} in a dict batch with keys "
            f"{list(batch)}. Pass get_input=lambda batch: batch['<your key>']."
        )
    raise TypeError(
        f"default_get_input(batch) cannot find the input in a batch of type {type(batch).__name__}; expected a "
        "tensor, a non-empty tuple/list (input first) or a dict. Pass get_input=lambda batch: ... that returns "
        "the network input."
    )


def default_get_target(batch: Any) -> Tensor | None:
    """The target of a batch: element 1 of a tuple/list, a known key of a dict, or ``None`` when there is none.

    Args:
        batch: what the dataloader yields.

    Returns:
        The target, or ``None`` for a bare tensor, a 1-element tuple or a dict without a target key.

    Raises:
        TypeError: if the batch is none of these layouts.

    Example:
        >>> y = torch.tensor([0, 1])
        >>> default_get_target((torch.zeros(2, 3), y)) is y, default_get_target(torch.zeros(2, 3))
        (True, None)
    """
    if isinstance(batch, Tensor):
        return None
    if isinstance(batch, (tuple, list)):
        return batch[1] if len(batch) > 1 else None
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
        return None
    raise TypeError(
        f"default_get_target(batch) cannot find the target in a batch of type {type(batch).__name__}; expected a "
        "tensor, a tuple/list (target second) or a dict. Pass get_target=lambda batch: ... (or lambda batch: None "
        "to check only the outputs)."
    )


@dataclass
class VerificationResult:
    """The outcome of comparing an original network with its fused form.

    Attributes:
        metric_original: task metric values of the original network, by name (empty without targets).
        metric_fused: the same metrics for the fused network.
        max_abs_diff: the largest absolute difference between the two networks' outputs, over the output leaves
            of the same shape in both (0 when none was).
        top1_agreement: the share of samples whose argmax over dim 1 agrees, for 2-D outputs; else ``None``.
        num_samples: samples compared (the batches' sizes, never the length of a list of outputs).
        tolerance: the largest allowed ``|fused - original|`` per metric.
        passed: whether every metric stayed within ``tolerance``; without a metric, whether the outputs did:
            ``max_rel_diff <= output_tolerance`` (``tolerance`` when not given), relative to each output leaf's
            scale; where outputs vary in shape (post-processed detections), the continuous parts decide
            (``parts_max_rel_diff``). With a metric and ``output_tolerance``, the outputs must hold it too. For
            detections, a metric beyond ``tolerance`` still passes when every image whose detections differ is
            explained by exact score ties broken differently (see ``ties``).
        output_tolerance: the largest allowed ``max_rel_diff``, or ``None`` when outputs are only reported.
        notes: what was not checked, and why.
        max_rel_diff: the largest difference of an output leaf relative to its scale (the largest finite
            ``|original|`` of that leaf), over the leaves of the same shape in both.
        varying: the output leaves whose shapes differed between the networks on some batch (post-processed
            outputs, e.g. ``[0]['boxes']``): not compared, the metric judges them.
        parts: the sub-modules whose outputs were compared where the network's own outputs vary in shape (the
            continuous parts: backbone features, head outputs), by path.
        parts_max_rel_diff: the largest relative difference over ``parts``, or ``None`` when none was compared.
        detections: for detection outputs (lists of ``boxes``/``scores``/``labels`` dicts), how the detections
            agree image by image in score order, down to the first tied score level where they part
            (:func:`fx_lightning.verify.detections.compare_detections`); ``None`` for other outputs.
        ties: where the metric differs beyond ``tolerance`` on detections whose images differ, whether score ties
            explain it, in one sentence (also among ``notes``); ``""`` otherwise.
    """

    metric_original: dict[str, float]
    metric_fused: dict[str, float]
    max_abs_diff: float
    top1_agreement: float | None
    num_samples: int
    tolerance: float
    passed: bool
    output_tolerance: float | None = None
    notes: list[str] = field(default_factory=list)
    max_rel_diff: float = 0.0
    varying: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    parts_max_rel_diff: float | None = None
    detections: DetectionAgreement | None = None
    ties: str = ""

    @property
    def compared(self) -> str:
        """What the output figures were computed on, in one phrase."""
        if not self.varying:
            return "the outputs"
        shown = ", ".join(f"output{p}" for p in self.varying[:3]) + (" ..." if len(self.varying) > 3 else "")
        text = f"the output leaves of fixed shape ({len(self.varying)} vary in shape, post-processed: {shown})"
        if self.parts:
            names = ", ".join(self.parts[:4]) + (" ..." if len(self.parts) > 4 else "")
            text += f"; continuous parts compared: {names}"
        return text

    @property
    def metric_diff(self) -> dict[str, float]:
        """``|fused - original|`` per metric name."""
        return {k: abs(self.metric_fused[k] - v) for k, v in self.metric_original.items() if k in self.metric_fused}

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON-serialisable data."""
        return asdict(self)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"verification {verdict} on {self.num_samples} samples (metric tolerance {self.tolerance:g})"]
        diffs = self.metric_diff
        width = max((len(k) for k in diffs), default=0)
        for name, diff in diffs.items():
            lines.append(
                f"  {name:<{width}}  original {self.metric_original[name]:.6f}  fused {self.metric_fused[name]:.6f}"
                f"  |diff| {diff:.2e}"
            )
        outputs = f"  outputs: max rel diff {self.max_rel_diff:.3e}"
        if self.output_tolerance is not None:
            outputs += f" (tolerance {self.output_tolerance:g})"
        outputs += f", max |diff| {self.max_abs_diff:.3e}"
        if self.varying:
            outputs += f", on {self.compared}"
        if self.parts_max_rel_diff is not None:
            outputs += f"; parts max rel diff {self.parts_max_rel_diff:.3e}"
        if self.top1_agreement is not None:
            outputs += f", top-1 agreement {100 * self.top1_agreement:.2f}%"
        lines.append(outputs)
        if self.detections is not None and self.detections.differing:
            lines.append(f"  detections: {self.detections.describe()}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


GetInput = Callable[[Any], Any]
GetTarget = Callable[[Any], "Tensor | None"]


class Verifier(nn.Module):
    """Accumulates the task metric of two networks and the closeness of their outputs, batch by batch.

    The metric given is updated with the original network's outputs and a clone of it with the fused
    network's; output closeness is kept in ``MaxMetric``/``MeanMetric``/``SumMetric``. All are torchmetrics
    metrics registered as sub-modules, so ``compute()`` synchronises them across processes and
    ``verifier.to(device)`` moves them (``update`` also moves them to the outputs' device by itself).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> verifier = Verifier(tolerance=1e-3)
        >>> verifier.update(net, net, (torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> result = verifier.compute()
        >>> result.passed, result.num_samples, result.max_abs_diff
        (True, 8, 0.0)
    """

    def __init__(
        self,
        metric: Metric | MetricCollection | None = None,
        tolerance: float = 1e-3,
        get_input: GetInput = default_get_input,
        get_target: GetTarget = default_get_target,
        *,
        output_tolerance: float | None = None,
    ) -> None:
        """Configure the comparison.

        Args:
            metric: the task metric, e.g. ``MulticlassAccuracy(num_classes=10)`` or a ``MetricCollection``.
                It is reset and then updated with the original network's outputs (see :func:`scored_output`).
                ``None`` chooses one from the first batch with targets (see :func:`default_metric`); when none
                fits, only the outputs are compared, and the result says so.
            tolerance: the largest allowed ``|fused - original|`` of each metric value; negative never passes.
            get_input: maps a batch to the network input (a tuple is unpacked as positional arguments).
            get_target: maps a batch to the metric target, or ``None`` to skip the metric for that batch.
            output_tolerance: if given, ``max_rel_diff`` (each output leaf's largest difference relative to its
                scale) must also stay within it to pass; without a metric, the outputs are held to it instead of
                ``tolerance``.

        Raises:
            TypeError: if an argument has the wrong type.
            ValueError: if a tolerance is NaN.
        """
        super().__init__()
        self.tolerance = check_tolerance("Verifier", "tolerance", tolerance)
        self.output_tolerance = (
            None if output_tolerance is None else check_tolerance("Verifier", "output_tolerance", output_tolerance)
        )
        check_metric("Verifier", metric)
        check_callable("Verifier", "get_input", get_input)
        check_callable("Verifier", "get_target", get_target)
        self.get_input = get_input
        self.get_target = get_target
        self.metric_original: Metric | MetricCollection | None = None
        self.metric_fused: Metric | MetricCollection | None = None
        if metric is not None:
            metric.reset()
            self.metric_original = metric
            self.metric_fused = metric.clone()
        self.max_abs_diff = MaxMetric(nan_strategy="disable")
        self.max_rel_diff = MaxMetric(nan_strategy="disable")
        self.parts_max_rel_diff = MaxMetric(nan_strategy="disable")
        self.top1_agreement = MeanMetric()
        self.num_samples = SumMetric()
        self.num_targeted = SumMetric()
        self.num_varying = SumMetric()
        # detections compared in score order (compare_detections): images, differing, explained, detections
        self.detection_counts = nn.ModuleDict(
            {name: SumMetric() for name in ("images", "differing", "explained", "agreed", "total")}
        )
        #: Why differing images are not explained by score ties (the first few, this process).
        self.detection_failures: list[str] = []
        self._batches = 0
        #: Why the task metric is not computed (no default metric fits the outputs and targets), or "".
        self.outputs_only = ""
        #: Output leaves whose shapes differed on some batch, and the sub-modules compared instead (this process).
        self.varying: list[str] = []
        self.parts: list[str] = []

    def forward(self, original: nn.Module, fused: nn.Module, batch: Any) -> None:
        """Same as :meth:`update`."""
        self.update(original, fused, batch)

    def update(
        self,
        original: Callable[..., Any],
        fused: Callable[..., Any],
        batch: Any,
        *,
        parts: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        """Run both networks on the batch's input and accumulate metrics and output closeness.

        Both run in eval mode under ``torch.no_grad()``; their ``training`` flags are restored afterwards.
        Floating inputs are cast to each network's parameter dtype and moved to its device. Outputs of any form
        (tensor, tuple, dict, list of dicts, ``ModelOutput``) are compared leaf by leaf, each relative to its own
        scale (:func:`fx_lightning.verify.compare.compare_trees`); leaves whose shapes differ (a box count changed by
        rounding) are listed, never an error. With ``parts``, the outputs of the sub-modules at the same paths of
        the two networks (the continuous parts before any post-processing) are compared on the same batch.
        Detections (lists of ``boxes``/``scores``/``labels`` dicts) are also compared image by image in score order,
        down to the first tied score level where they part (:func:`fx_lightning.verify.detections.
        compare_detections`), so that a metric moved only by exact score ties broken differently can pass.

        Args:
            original: the network before fusion.
            fused: the fused network.
            batch: one batch as the dataloader yields it.
            parts: ``(original network, fused network)`` whose sub-modules to compare, when ``original`` and
                ``fused`` are functions that run them (``None``: the two networks themselves, when modules).

        Raises:
            TypeError: if the networks are not callable.
            ValueError: if the two networks' outputs differ in structure.
        """
        for name, net in (("original", original), ("fused", fused)):
            if not callable(net):
                raise TypeError(
                    f"Verifier.update({name}=...) expects a network (nn.Module or callable), got "
                    f"{type(net).__name__}. Call update(original_net, fused_net, batch)."
                )
        if parts is None and isinstance(original, nn.Module) and isinstance(fused, nn.Module):
            parts = (original, fused)
        inputs = self.get_input(batch)
        target = self.get_target(batch)
        with torch.no_grad():
            with capture_parts(parts[0] if parts else None) as seen_original:
                out_original = _run(original, inputs)
            with capture_parts(parts[1] if parts else None) as seen_fused:
                out_fused = _run(fused, inputs)
        limit = self.tolerance if self.output_tolerance is None else self.output_tolerance
        difference = compare_trees(out_original, out_fused, rtol=max(limit, 0.0))
        kinds = [isinstance(x, Tensor) for x in tree_leaves(out_original)] != [
            isinstance(x, Tensor) for x in tree_leaves(out_fused)
        ]
        if difference.structure or kinds:
            raise ValueError(
                f"Verifier.update(): the original network returned {_describe(out_original)} but the fused one "
                f"{_describe(out_fused)}. They must compute the same function; check the fusion report."
            )
        preds_original, preds_fused = scored_output(out_original), scored_output(out_fused)
        device = _device_of(out_original)
        if self.metric_original is None and target is not None:
            self.default_metric_for(out_original, target)
        self.to(device)

        self.max_abs_diff.update(torch.tensor(difference.max_abs, device=device, dtype=torch.float64))
        self.max_rel_diff.update(torch.tensor(difference.max_rel, device=device, dtype=torch.float64))
        self.num_varying.update(torch.tensor(float(len(difference.varying)), device=device))
        for leaf in difference.varying:
            if leaf.path not in self.varying:
                self.varying.append(leaf.path)
        if difference.varying:
            parts_diff = _compare_parts(seen_original, seen_fused, max(limit, 0.0))
            for path in parts_diff:
                if path not in self.parts:
                    self.parts.append(path)
            if parts_diff:
                worst = max(c.max_rel for c in parts_diff.values())
                self.parts_max_rel_diff.update(torch.tensor(worst, device=device, dtype=torch.float64))
        self._compare_detections(preds_original, preds_fused, max(limit, 0.0), device)
        batch_size = _batch_size(preds_original, inputs)
        self.num_samples.update(torch.tensor(float(batch_size), device=device))
        if isinstance(preds_original, Tensor) and preds_original.dim() == 2 and preds_original.shape[0] > 0:
            agree = (preds_original.argmax(dim=1) == preds_fused.to(device).argmax(dim=1)).to(torch.float32)
            self.top1_agreement.update(agree)
        if target is not None and self.metric_original is not None and self.metric_fused is not None:
            shapes = [tuple(p.shape) if isinstance(p, Tensor) else None for p in (preds_original, preds_fused)]
            if shapes[0] is not None and shapes[0] != shapes[1]:  # the metric cannot score a tensor of another shape
                raise ValueError(
                    f"Verifier.update(): the original network returned shape {shapes[0]} but the fused one "
                    f"{shapes[1]} for what the metric scores. They must compute the same function; check the fusion "
                    "report."
                )
            target = tree_to(target, device=device)
            self.metric_original.update(_as_float(preds_original), target)
            self.metric_fused.update(_as_float(tree_to(preds_fused, device=device)), target)
            self.num_targeted.update(torch.tensor(float(batch_size), device=device))

    def _compare_detections(self, original: Any, fused: Any, rtol: float, device: torch.device) -> None:
        """Count how two batches of detections agree in score order (nothing for other outputs)."""
        batch = self._batches
        self._batches += 1
        if not (is_detections(original) and is_detections(fused) and len(original) == len(fused)):
            return
        agreement = DetectionAgreement()
        for i, image in enumerate(compare_detections(original, fused, rtol=rtol)):
            agreement.add(image, f"batch {batch}, image {i}")
        for name, metric in self.detection_counts.items():
            metric.update(torch.tensor(float(getattr(agreement, name)), device=device))
        room = DetectionAgreement.KEEP - len(self.detection_failures)
        self.detection_failures += agreement.failures[: max(room, 0)]

    def default_metric_for(self, outputs: Any, target: Any = None) -> None:
        """Choose the default metric (``metric=None``) from one batch of the original network's outputs and its
        targets, now (see :func:`default_metric`).

        ``update`` does it at the first batch with targets; a process that may see no batch (a distributed run
        with fewer batches than processes) calls this first, so every process holds the same metric to
        synchronise. When no default fits, verification compares the outputs only and says so. Does nothing
        when a metric is already set.
        """
        if self.metric_original is not None or self.outputs_only:
            return
        metric = default_metric(outputs, target)
        if metric is None:
            self.outputs_only = (
                f"no default metric fits outputs {_describe(scored_output(outputs))} with targets "
                f"{_describe(target)}: only the outputs were compared; pass metric=... for the task"
            )
            return
        metric = metric.to(_device_of(outputs))
        self.metric_original = metric
        self.metric_fused = metric.clone()

    def compute(self) -> VerificationResult:
        """Return the comparison over every batch seen (over every process when distributed).

        Raises:
            RuntimeError: if no batch was seen.
        """
        with warnings.catch_warnings():
            # An aggregation never updated (no 2-D outputs) warns on compute; that case is reported as None.
            warnings.filterwarnings("ignore", message=r".*compute.*before.*update.*")
            num_samples = int(round(float(self.num_samples.compute())))
            num_targeted = int(round(float(self.num_targeted.compute())))
            max_abs_diff = float(self.max_abs_diff.compute())
            max_rel_diff = float(self.max_rel_diff.compute())
            parts_value = float(self.parts_max_rel_diff.compute())
            num_varying = int(round(float(self.num_varying.compute())))
            top1 = float(self.top1_agreement.compute())
            counts = {name: int(round(float(m.compute()))) for name, m in self.detection_counts.items()}
        if num_samples == 0:
            raise RuntimeError(
                "Verifier.compute() was called before any batch was seen. Feed batches with "
                "verifier.update(original, fused, batch) first."
            )
        notes: list[str] = []
        metric_original: dict[str, float] = {}
        metric_fused: dict[str, float] = {}
        limit = self.tolerance if self.output_tolerance is None else self.output_tolerance
        rule = f"max rel diff <= {limit:g}, relative to each output's scale"
        if self.outputs_only:
            notes.append(f"{self.outputs_only} ({rule})")
        elif num_targeted == 0:
            notes.append(f"no targets in the batches: only the outputs were compared ({rule}), not the task metric")
        else:
            assert self.metric_original is not None  # built at the first batch
            assert self.metric_fused is not None
            metric_original = _to_floats(self.metric_original)
            metric_fused = _to_floats(self.metric_fused)
            if num_targeted < num_samples:
                notes.append(f"the task metric covers the {num_targeted} of {num_samples} samples that had targets")
        top1_agreement = None if math.isnan(top1) else top1
        if top1_agreement is None:
            notes.append("outputs are not 2-D logits: top-1 agreement not computed")
        parts_max_rel = parts_value if math.isfinite(parts_value) or parts_value > 0 else None
        varying = bool(num_varying)
        if varying:
            judge = "the task metric" if metric_original else "the continuous parts"
            where = ", ".join(f"output{p}" for p in self.varying[:3]) or "on another process"
            notes.append(
                f"outputs vary in shape between the networks (post-processed: {where}): those leaves were not "
                f"compared, the verdict comes from {judge}; "
                + (
                    f"continuous parts compared: {', '.join(self.parts)} (max rel diff {parts_max_rel:.3g})"
                    if parts_max_rel is not None
                    else "no sub-module of fixed-shape output was compared"
                )
            )

        detections = DetectionAgreement(**counts, failures=list(self.detection_failures)) if counts["images"] else None
        ties = ""
        if metric_original:
            same_names = set(metric_original) == set(metric_fused)
            passed = same_names and all(abs(metric_fused[k] - v) <= self.tolerance for k, v in metric_original.items())
            if not passed and same_names and self.tolerance >= 0 and detections is not None and detections.differing:
                # post-processing that broke exact score ties differently moves the metric without an error
                ties = _ties_sentence(metric_original, metric_fused, self.tolerance, detections)
                passed = detections.explains_all
                notes.append(ties)
            if self.output_tolerance is not None:
                passed = passed and max_rel_diff <= self.output_tolerance
        elif varying:
            # Post-processed outputs without a metric: the sub-modules' continuous outputs are what can be judged.
            passed = parts_max_rel is not None and parts_max_rel <= limit
            if parts_max_rel is None:
                notes.append(
                    "nothing continuous was compared and no task metric judges the post-processed outputs: pass "
                    "metric=... (e.g. MeanAveragePrecision() for detections) and batches with targets"
                )
        else:
            passed = max_rel_diff <= limit
        return VerificationResult(
            metric_original=metric_original,
            metric_fused=metric_fused,
            max_abs_diff=max_abs_diff,
            top1_agreement=top1_agreement,
            num_samples=num_samples,
            tolerance=self.tolerance,
            passed=bool(passed),
            output_tolerance=self.output_tolerance,
            notes=notes,
            max_rel_diff=max_rel_diff,
            varying=list(self.varying),
            parts=list(self.parts),
            parts_max_rel_diff=parts_max_rel,
            detections=detections,
            ties=ties,
        )

    def reset(self) -> None:
        """Forget every batch seen so far."""
        for metric in (
            self.metric_original,
            self.metric_fused,
            self.max_abs_diff,
            self.max_rel_diff,
            self.parts_max_rel_diff,
            self.top1_agreement,
        ):
            if metric is not None:
                metric.reset()
        self.num_samples.reset()
        self.num_targeted.reset()
        self.num_varying.reset()
        for metric in self.detection_counts.values():
            metric.reset()
        self.detection_failures.clear()
        self._batches = 0
        self.varying.clear()
        self.parts.clear()


def verify(
    original: Callable[..., Any],
    fused: Callable[..., Any],
    batches: Iterable[Any],
    *,
    metric: Metric | MetricCollection | None = None,
    tolerance: float = 1e-3,
    max_batches: int | None = None,
    get_input: GetInput = default_get_input,
    get_target: GetTarget = default_get_target,
    output_tolerance: float | None = None,
) -> VerificationResult:
    """Compare ``original`` and ``fused`` over ``batches`` (a DataLoader or any iterable of batches).

    Args:
        original: the network before fusion.
        fused: the fused network, e.g. ``fx_lightning.fuse(original)``.
        batches: an iterable of batches, e.g. a validation DataLoader.
        metric: the task metric; ``None`` chooses one from the outputs and targets (:func:`default_metric`).
        tolerance: the largest allowed ``|fused - original|`` of each metric value.
        max_batches: stop after this many batches; ``None`` for all.
        get_input: maps a batch to the network input.
        get_target: maps a batch to the metric target (``None`` to compare outputs only).
        output_tolerance: if given, the largest allowed absolute difference between outputs.

    Returns:
        The :class:`VerificationResult`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if ``max_batches`` is not positive or ``batches`` is empty.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
        >>> from fx_lightning import fuse
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> verify(net, fuse(net, (data[0][0],)), data).passed
        True
    """
    check_max_batches("verify", "max_batches", max_batches)
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"verify(batches=...) expects an iterable of batches such as a DataLoader, got {type(batches).__name__}. "
            "Wrap a single batch in a list: verify(original, fused, [batch])."
        )
    verifier = Verifier(metric, tolerance, get_input, get_target, output_tolerance=output_tolerance)
    seen = 0
    for batch in batches:
        verifier.update(original, fused, batch)
        seen += 1
        if max_batches is not None and seen >= max_batches:
            break
    if seen == 0:
        raise ValueError("verify(batches=...) got no batches. Pass a non-empty DataLoader or list of batches.")
    return verifier.compute()


def _ties_sentence(
    original: dict[str, float], fused: dict[str, float], tolerance: float, detections: DetectionAgreement
) -> str:
    """Whether exact score ties explain a metric difference beyond ``tolerance``, in one sentence."""
    name, diff = max(((k, abs(fused[k] - v)) for k, v in original.items() if k in fused), key=lambda kv: kv[1])
    differs = f"{name} differs by {diff:.3g} (tolerance {tolerance:g})"
    if detections.explains_all:
        return (
            f"{differs}: the two networks broke exact score ties differently; detections agree down to the first "
            f"tie in every image ({detections.agreed} of {detections.total} detections compared; "
            f"{detections.differing} of {detections.images} images differ, each at a tied score level)"
        )
    unexplained = detections.differing - detections.explained
    return (
        f"{differs}, and {unexplained} of the {detections.differing} images whose detections differ are not "
        f"explained by score ties ({detections.describe()}): " + "; ".join(detections.failures)
    )


def _run(net: Callable[..., Any], inputs: Any) -> Any:
    inputs = like_module(inputs, net)
    with eval_mode(net):
        return call_with_input(net, inputs)


def call_with_input(fn: Callable[..., Any], inputs: Any) -> Any:
    """Call ``fn`` with what ``get_input`` returned: a tuple as positional arguments, a dict as keyword arguments
    when ``fn``'s signature takes those names, anything else (a dict too, otherwise) as the one argument.

    Example:
        >>> call_with_input(lambda a, b: a - b, (3, 1)), call_with_input(lambda a, b: a - b, {"b": 1, "a": 3})
        (2, 2)
    """
    if isinstance(inputs, tuple):
        return fn(*inputs)
    if isinstance(inputs, Mapping) and _takes_keywords(fn, inputs):
        return fn(**inputs)
    return fn(inputs)


def _takes_keywords(fn: Callable[..., Any], inputs: Mapping[Any, Any]) -> bool:
    if not inputs or not all(isinstance(k, str) for k in inputs):
        return False
    try:
        inspect.signature(fn).bind(**inputs)
    except (TypeError, ValueError):
        return False
    return True


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave the global random state as found: torch (CPU and every initialised CUDA device), NumPy and ``random``.

    Iterating a DataLoader draws a seed from torch's generator; verifying inside someone else's run must not
    change the random numbers that come after it.

    Example:
        >>> with preserved_rng():
        ...     _ = torch.rand(1), np.random.rand(), random.random()
        >>> state = torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> torch.equal(state, torch.get_rng_state())
        True
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def eval_mode(net: Any) -> Iterator[None]:
    """Eval mode inside the block; afterwards every sub-module gets its own flag back (frozen BNs stay eval)."""
    if not isinstance(net, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def compare_outputs(original: Any, fused: Any) -> float:
    """The largest absolute difference between two outputs of any form (tensor, tuple, dict, list of dicts), over
    the leaves of the same shape (:func:`fx_lightning.verify.compare.compare_trees`, which also gives the relative
    figures); a NaN difference counts as infinite, non-tensor leaves must be equal (else infinite).

    Raises:
        ValueError: if the two outputs differ in structure.

    Example:
        >>> compare_outputs({"boxes": torch.ones(2, 4), "n": 2}, {"boxes": torch.ones(2, 4) * 1.5, "n": 2})
        0.5
    """
    comparison = compare_trees(original, fused, rtol=math.inf)
    if comparison.structure:
        raise ValueError(
            f"Verifier.update(): the original network returned {_describe(original)} but the fused one "
            f"{_describe(fused)}. They must compute the same function; check the fusion report."
        )
    return comparison.max_abs


#: Sub-modules whose own output a fold changes (the folded layer, the BatchNorm made an identity): never a part.
_FOLD_SITES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.Identity)


@contextlib.contextmanager
def capture_parts(network: nn.Module | None) -> Iterator[dict[str, list[Any]]]:
    """Record, while the block runs, the outputs of ``network``'s sub-modules that a comparison can use: its
    children, and the children of a child that is never called itself (a ``Sequential`` its parent iterates).

    Conv, linear, norm and identity layers are left out: folding changes their own output (the conv now computes
    what conv + BatchNorm did), never that of a module around them.

    Yields:
        path -> the outputs of each call of that sub-module, in call order (filled when the block ends).
    """
    seen: dict[str, list[Any]] = {}
    if network is None:
        yield seen
        return
    handles = []

    def hook(path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(path, []).append(output)

        return record

    try:
        for name, child in network.named_children():
            for path, part in ((name, child), *((f"{name}.{n}", c) for n, c in child.named_children())):
                if not isinstance(part, _FOLD_SITES):
                    handles.append(part.register_forward_hook(hook(path)))
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        # a grandchild counts only where its parent was not called as a whole
        for path in [p for p in seen if "." in p and p.split(".", 1)[0] in seen]:
            del seen[path]


def _compare_parts(original: dict[str, list[Any]], fused: dict[str, list[Any]], rtol: float) -> dict[str, Comparison]:
    """The parts seen in both runs with outputs of the same structure and shapes, each compared."""
    compared: dict[str, Comparison] = {}
    for path, outputs in original.items():
        other = fused.get(path)
        if other is None or len(other) != len(outputs):
            continue
        comparison = compare_trees(outputs, other, rtol=rtol)
        if comparison.structure or comparison.varying or not comparison.compared:
            continue  # a post-processed part (proposals, detections) says nothing continuous
        if not any(leaf.scale > 0 for leaf in comparison.compared):
            continue  # nothing floating in it (sizes, indices)
        compared[path] = comparison
    return compared


def scored_output(output: Any) -> Any:
    """What a metric scores: the output itself, the first element of a tuple (``(logits, aux)``), the
    ``logits``/``out``/``output`` entry of a dict; any other form (a list of detection dicts) as it is."""
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping):
        for key in ("logits", "out", "output"):
            if isinstance(output.get(key), Tensor):
                return output[key]
    return output


def default_metric(outputs: Any, target: Any) -> Metric | None:
    """The metric ``metric=None`` stands for, chosen from one batch of outputs and targets, or ``None``.

    * class logits ``(N, C)`` with integer targets ``(N,)``: ``MulticlassAccuracy(num_classes=C)``;
    * per-pixel logits ``(N, C, ...)`` with integer targets ``(N, ...)``: ``MulticlassJaccardIndex(num_classes=C)``;
    * floating outputs with floating targets of the same shape: ``MeanSquaredError()``;
    * detections (a list of ``{"boxes", "scores", "labels"}`` dicts, torchvision's form) with a list of
      ``{"boxes", "labels"}`` targets, integer labels: ``MeanAveragePrecision()`` (needs pycocotools).

    Example:
        >>> type(default_metric(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))).__name__
        'MulticlassAccuracy'
        >>> type(default_metric(torch.randn(4, 1), torch.randn(4, 1))).__name__, default_metric([{}], [{}])
        ('MeanSquaredError', None)
    """
    preds = scored_output(outputs)
    if (
        is_detections(preds)
        and is_detections(target, ("boxes", "labels"))
        and not any(t["labels"].is_floating_point() for t in target)  # MeanAveragePrecision takes class indices
    ):
        from torchmetrics.detection import MeanAveragePrecision  # imports pycocotools: only for detections

        return MeanAveragePrecision()
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor) or not preds.is_floating_point():
        return None
    if not target.is_floating_point() and target.dtype != torch.bool:
        classes = preds.shape[1] if preds.dim() >= 2 else 0
        if classes >= 2 and tuple(target.shape) == (preds.shape[0], *preds.shape[2:]):
            if preds.dim() == 2:
                return MulticlassAccuracy(num_classes=int(classes))
            return MulticlassJaccardIndex(num_classes=int(classes))
        return None
    if target.is_floating_point() and target.shape == preds.shape:
        return MeanSquaredError()
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        inner = f" of {_describe(value[0])}" if value else ""
        return f"a {type(value).__name__} of {len(value)}{inner}"
    return type(value).__name__ if value is not None else "None"


def _device_of(output: Any) -> torch.device:
    return next((t.device for t in tree_leaves(output) if isinstance(t, Tensor)), torch.device("cpu"))


def _batch_size(preds: Any, inputs: Any) -> int:
    """The batch's sample count: its inputs' (:func:`fx_lightning.trees.batch_size`, else their first batched
    tensor's); the outputs' only when the input has none. Never the length of a list of outputs (five feature maps
    of one batch are not five samples)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    size = batch_size(args)
    size = leading_size(args) if size is None else size
    if size is not None:
        return size
    if isinstance(preds, Tensor):
        return int(preds.shape[0]) if preds.dim() > 0 else 1
    if isinstance(preds, (list, tuple)) and preds and all(isinstance(p, Mapping) for p in preds):
        return len(preds)  # one detection dict per image
    return 1


def _as_float(preds: Any) -> Any:
    """Half-precision logits scored in float32, as the comparison runs."""
    if isinstance(preds, Tensor) and preds.is_floating_point():
        return preds.detach().to(torch.float32)
    return preds


def _to_floats(metric: Metric | MetricCollection) -> dict[str, float]:
    value = metric.compute()
    name = type(metric).__name__
    return _flatten(name, value) if not isinstance(metric, MetricCollection) else _flatten("", value)


def _flatten(prefix: str, value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, sub in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    if isinstance(value, (tuple, list)):
        out = {}
        for i, sub in enumerate(value):
            out.update(_flatten(f"{prefix}[{i}]", sub))
        return out
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return {prefix: float(value)}
        return {f"{prefix}[{i}]": float(v) for i, v in enumerate(value.flatten())}
    if isinstance(value, numbers.Real):
        return {prefix: float(value)}
    raise TypeError(
        f"Verifier: the metric returned {type(value).__name__} for '{prefix}', expected tensors or numbers. "
        "Use a metric whose compute() returns a tensor or a dict of tensors."
    )


def check_tolerance(owner: str, name: str, value: Any) -> float:
    """``value`` as a float, checked for ``owner(name=value)``.

    Raises:
        TypeError: if it is not a real number (``bool`` included).
        ValueError: if it is NaN.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{owner}({name}={value!r}) expects a number, got {type(value).__name__}, e.g. {name}=1e-3.")
    if math.isnan(float(value)):
        raise ValueError(f"{owner}({name}=nan) expects a number, e.g. {name}=1e-3.")
    return float(value)


def check_max_batches(owner: str, name: str, value: Any) -> None:
    """Check that a batch cap is ``None`` (all batches) or a positive integer (``ValueError`` if not)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{owner}({name}={value!r}) expects a positive integer or None (all batches).")


def check_metric(owner: str, metric: Any) -> None:
    """Check that ``metric`` is ``None`` or a torchmetrics ``Metric``/``MetricCollection`` (``TypeError`` if not)."""
    if metric is not None and not isinstance(metric, (Metric, MetricCollection)):
        raise TypeError(
            f"{owner}(metric={metric!r}) expects a torchmetrics Metric or MetricCollection, got "
            f"{type(metric).__name__}. Pass e.g. metric=torchmetrics.classification.MulticlassAccuracy("
            "num_classes=10), or None."
        )


def check_callable(owner: str, name: str, fn: Any) -> None:
    """Check that ``fn`` is callable (``TypeError`` if not)."""
    if not callable(fn):
        raise TypeError(f"{owner}({name}=...) expects a function of the batch, got {type(fn).__name__}.")

"""The int8 gate: opt-in int8 post-training quantization of the deploy artifacts, held to the task metric.

Folding BatchNorm changes outputs by rounding; int8 changes them by whole accuracy points. So an int8 artifact is
made from the float artifact of its format (and timed against it), checked in the same runtime with the same
metric and data, and held to its own budget: ``|metric_int8 - metric_original| <= max_metric_drop``
(absolute, for each metric value).

For each format asked for, with its registered backend (:mod:`fx_lightning.deploy.int8.backends`; ``"onnx"``: ONNX
Runtime static QDQ quantization, :mod:`fx_lightning.deploy.int8.onnx`; ``"aoti"``: torchao's PT2E flow compiled by
AOTInductor, :mod:`fx_lightning.deploy.int8.pt2e`):

1. calibrate on the calibration inputs (training batches, read by the caller) and quantize every layer;
2. verify it in its runtime over the verification data (:func:`fx_lightning.deploy.check.check_in_runtimes`);
3. over budget: rank the layers by their error alone on the calibration inputs (each layer quantized on its own,
   the outputs compared with the float file's) and keep the most sensitive ones in float, adding them back one at
   a time up to ``max_float_layers``, verifying each time;
4. return the int8 :class:`~fx_lightning.deploy.export.Artifact` (``"onnx-int8"``) with its budget as its tolerance,
   its float artifact as its base, and what happened under ``details["int8"]``, for
   :func:`fx_lightning.deploy.check.verify_artifacts` to check once more beside the float artifacts, time and
   report. Still over budget, it fails there: renamed ``*.FAILED.*``, not announced, and the warning says by how
   much it missed.

Nothing here imports Lightning. Calibration never runs the user's network, so neither its weights, its BatchNorm
statistics nor the random state change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torchmetrics import Metric, MetricCollection

from fx_lightning.deploy.check import check_in_runtimes, failed_path
from fx_lightning.deploy.export import Artifact
from fx_lightning.deploy.int8.backends import BACKENDS
from fx_lightning.deploy.int8.options import Int8Options
from fx_lightning.deploy.report import ArtifactReport
from fx_lightning.errors import first_line
from fx_lightning.loaders import read_batches
from fx_lightning.trees import floating_dtype, leading_size, padded_rows, tree_to
from fx_lightning.verify.verifier import GetInput, GetTarget, default_get_input, default_get_target, preserved_rng

SUFFIX = "-int8"

__all__ = ["SUFFIX", "conform_batches", "int8_path", "quantize_artifacts", "unmade"]


def quantize_artifacts(
    written: Mapping[str, Artifact],
    original: nn.Module,
    fused: nn.Module,
    calibration: Iterable[Any],
    batches: Iterable[Any],
    example_inputs: Sequence[Any],
    options: Int8Options,
    *,
    metric: Metric | MetricCollection | None = None,
    get_input: GetInput = default_get_input,
    get_target: GetTarget = default_get_target,
    max_batches: int | None = None,
    owner: str = "quantize_artifacts",
) -> dict[str, Artifact]:
    """Make, calibrate and gate the int8 version of each float artifact ``options.formats`` names.

    Args:
        written: the float artifacts (:func:`fx_lightning.deploy.export.write_artifacts`); each int8 one is made from
            the float one of its format and written next to it (``model.onnx`` -> ``model.int8.onnx``).
        original: the network before fusion: the reference of the metric.
        fused: the fused network the float artifacts were written from.
        calibration: batches to calibrate on (the training data); the first ``options.calibration_batches`` are
            read once, mapped by ``get_input``.
        batches: the verification data; iterated once per attempt, so it must be re-iterable (a DataLoader, a
            list).
        example_inputs: the positional inputs the artifacts were written with.
        options: what to make, and the budget.
        metric: the task metric (``None`` chooses one from outputs and targets).
        get_input: maps a batch to the network input.
        get_target: maps a batch to the metric target.
        max_batches: verify on at most this many batches.
        owner: the function the user called, which error messages name.

    Returns:
        ``"<format>-int8"`` -> its :class:`~fx_lightning.deploy.export.Artifact` (``tolerance`` = the budget, ``base`` =
        the float format, ``details["int8"]`` = calibration time, layers kept in float, every attempt), to pass
        to :func:`fx_lightning.deploy.check.verify_artifacts` with the float ones. One that could not be made
        carries its ``error``; one over budget is the last attempt, which that check fails.

    Raises:
        ValueError: if no calibration input could be read.
    """
    inputs = tuple(example_inputs)
    with preserved_rng():  # reading a DataLoader draws its seed from torch's generator
        calibration_inputs = _calibration_inputs(calibration, options.calibration_batches, get_input, inputs)
    if not calibration_inputs:
        raise ValueError(
            f"{owner}(calibration=...) gave no batches: int8 calibration needs training batches. Pass "
            "the training DataLoader (or a list of batches)."
        )
    made: dict[str, Artifact] = {}
    for fmt in options.formats:
        name = fmt + SUFFIX
        base = written.get(fmt)
        if base is None or base.error or not base.path.exists():
            error = f"its float '{fmt}' artifact was not written, so there is nothing to quantize"
            made[name] = unmade(fmt, base, error)
            continue
        gate = _Gate(
            name, base, options, original, fused, batches, inputs, metric, get_input, get_target, max_batches, owner
        )
        with preserved_rng():
            made[name] = gate.run(calibration_inputs)
    return made


# ----------------------------------------------------------------------------------------- the gate


@dataclass
class _Gate:
    """One int8 artifact: quantize, verify, fall back layer by layer while over budget."""

    name: str
    base: Artifact
    options: Int8Options
    original: nn.Module
    fused: nn.Module
    batches: Iterable[Any]
    inputs: tuple[Any, ...]
    metric: Metric | MetricCollection | None
    get_input: GetInput
    get_target: GetTarget
    max_batches: int | None
    owner: str
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def run(self, calibration: list[tuple[Any, ...]]) -> Artifact:
        start = time.perf_counter()
        path = int8_path(self.base.path)
        details: dict[str, Any] = {
            "float_artifact": self.base.format,
            "max_metric_drop": self.options.max_metric_drop,
            "calibration_batches": len(calibration),
            "float_layers": [],
            "attempts": self.attempts,
        }
        artifact = self._artifact(path, details)
        for stale in (path, failed_path(path)):  # an earlier run's file is never reported as this one's
            stale.unlink(missing_ok=True)
        quantizer = None
        try:
            calibration = conform_batches(calibration, self.base.batch_size)
            quantizer = BACKENDS[self.base.format].make(self.base, self.fused, self.inputs, calibration, self.options)
            details["calibration_samples"] = quantizer.num_samples
            details |= quantizer.facts()
            details["layers"] = len(quantizer.layers)
            details["notes"] = quantizer.notes
            quantizer.write(path)
            details["calibration_s"] = quantizer.calibration_s
            passed = self._attempt(artifact, [])
            if not passed and self.options.max_float_layers and quantizer.layers:
                ranking = quantizer.sensitivity()
                details["sensitivity"] = [{"layer": quantizer.label(layer), "error": error} for layer, error in ranking]
                for count in range(1, min(self.options.max_float_layers, len(ranking)) + 1):
                    float_layers = [layer for layer, _ in ranking[:count]]
                    quantizer.write(path, float_layers)
                    details["float_layers"] = [quantizer.label(layer) for layer in float_layers]
                    if self._attempt(artifact, float_layers):
                        break
        except Exception as err:  # noqa: BLE001 - a quantizer failure fails this artifact, not the run
            artifact.error = f"int8 quantization failed: {type(err).__name__}: {first_line(err)}"
        finally:
            if quantizer is not None:
                quantizer.close()
        details["summary"] = self._summary(details)
        details["seconds"] = time.perf_counter() - start
        artifact.seconds = details["seconds"]
        return artifact

    def _artifact(self, path: Path, details: dict[str, Any]) -> Artifact:
        return replace(
            self.base,
            runner=None,
            format=self.name,
            path=path,
            runtime=f"{self.base.runtime}, {BACKENDS[self.base.format].how}",
            loader=self.base.loader or self.base.format,
            tolerance=self.options.max_metric_drop,
            base=self.base.format,
            details={"int8": details},
            seconds=0.0,
            error="",
        )

    def _attempt(self, artifact: Artifact, float_layers: list[str]) -> bool:
        reports, _ = check_in_runtimes(
            {self.name: artifact},
            self.original,
            self.fused,
            self.batches,
            self.inputs,
            metric=self.metric.clone() if self.metric is not None else None,
            tolerance=self.options.max_metric_drop,
            output_tolerance=None,
            get_input=self.get_input,
            get_target=self.get_target,
            max_batches=self.max_batches,
            owner=self.owner,
        )
        report = reports[self.name]
        self.attempts.append(_attempt_record(report, float_layers))
        return report.passed

    def _summary(self, details: dict[str, Any]) -> str:
        if not self.attempts:
            return "not quantized"
        last = self.attempts[-1]
        kept = details["float_layers"]
        layers = f"{len(kept)} layer(s) kept in float ({', '.join(kept)})" if kept else "every layer quantized"
        if last["passed"]:
            return f"{layers}; metric drop {last['worst_drop']:.4g} within {self.options.max_metric_drop:g}"
        if last["error"]:
            return f"{layers}; it could not be checked: {last['error']}"
        tried = f" after {len(self.attempts)} attempt(s)" if len(self.attempts) > 1 else ""
        return (
            f"over budget{tried}: {layers}, metric drop {last['worst_drop']:.4g}, budget "
            f"{self.options.max_metric_drop:g}, missed by {last['worst_drop'] - self.options.max_metric_drop:.4g}"
        )


def _attempt_record(report: ArtifactReport, float_layers: list[str]) -> dict[str, Any]:
    v = report.verification
    drops = {k: value - v.metric_fused.get(k, math.nan) for k, value in v.metric_original.items()} if v else {}
    worst = max((abs(d) for d in drops.values()), default=math.nan)
    return {
        "float_layers": len(float_layers),
        "metric": dict(v.metric_fused) if v else {},
        "metric_drop": drops,
        "worst_drop": worst,
        "max_abs_diff": v.max_abs_diff if v else None,
        "passed": report.passed,
        "error": report.error or None,
    }


# ----------------------------------------------------------------------------------------- helpers


def unmade(fmt: str, base: Artifact | None, error: str) -> Artifact:
    """The int8 artifact of ``fmt`` that could not be made: reported (never loaded) under its own int8 path, never
    under the float file's, which a failure would rename."""
    path = int8_path(base.path) if base is not None else Path(fmt + SUFFIX)
    return Artifact(fmt + SUFFIX, path, base=fmt, error=error)


def int8_path(float_path: Path) -> Path:
    """Where the int8 version of a float artifact is written: ``.int8`` before the last suffix.

    Example:
        >>> int8_path(Path("out/model.onnx")).name, int8_path(Path("out/model.aoti.pt2")).name
        ('model.int8.onnx', 'model.aoti.int8.pt2')
    """
    return float_path.with_name(f"{float_path.stem}.int8{float_path.suffix}")


def _calibration_inputs(
    calibration: Iterable[Any], count: int, get_input: GetInput, example: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    """The positional inputs of the first ``count`` batches, on the CPU, floating tensors in the example's dtype."""
    dtype = floating_dtype(example)
    taken: list[tuple[Any, ...]] = []
    for batch in read_batches(calibration, count):
        x = get_input(batch)
        args = x if isinstance(x, tuple) else (x,)
        detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, args)
        taken.append(tree_to(detached, device="cpu", dtype=dtype))
    return taken


def conform_batches(calibration: list[tuple[Any, ...]], batch_size: int | None) -> list[tuple[Any, ...]]:
    """The calibration inputs in batches an artifact of fixed ``batch_size`` runs: each batch cut in chunks of that
    size (a short last chunk dropped, unless it is all the batch has: then padded with copies of its last sample).

    Example:
        >>> import torch
        >>> [a[0].shape[0] for a in conform_batches([(torch.zeros(10, 2),), (torch.zeros(3, 2),)], 4)]
        [4, 4, 4]
    """
    if batch_size is None:
        return calibration
    conformed = []
    for args in calibration:
        size = leading_size(args)
        size = batch_size if size is None else size
        for start in range(0, size - batch_size + 1, batch_size) if size >= batch_size else [0]:
            conformed.append(tree_map(lambda t, s=start: padded_rows(t, s, batch_size), args))
    return conformed

"""Opt-in int8 post-training quantization of the deploy artifacts, gated by the task metric.

Folding BatchNorm changes outputs by rounding; int8 changes them by whole accuracy points. So an int8 artifact is
made from the float artifact of its format (and timed against it), checked in the same runtime with the same
metric and data, and held to its own budget: ``|metric_int8 - metric_original| <= max_metric_drop``
(absolute, for each metric value).

For each format asked for (``"onnx"``: ONNX Runtime static QDQ quantization, :mod:`fx_lightning.deploy.int8.onnx`;
``"aoti"``: torchao's PT2E flow compiled by AOTInductor, :mod:`fx_lightning.deploy.int8.pt2e`):

1. calibrate on the calibration inputs (training batches, read by the caller) and quantize every layer;
2. verify it in its runtime over the verification data (:func:`fx_lightning.deploy.flow.check_in_runtimes`);
3. over budget: rank the layers by their error alone on the calibration inputs (each layer quantized on its own,
   the outputs compared with the float file's) and keep the most sensitive ones in float, adding them back one at
   a time up to ``max_float_layers``, verifying each time;
4. return the int8 :class:`~fx_lightning.deploy.export.Artifact` (``"onnx-int8"``) with its budget as its tolerance,
   its float artifact as its base, and what happened under ``details["int8"]``, for
   :func:`fx_lightning.deploy.flow.verify_artifacts` to check once more beside the float artifacts, time and
   report. Still over budget, it fails there: renamed ``*.FAILED.*``, not announced, and the warning says by how
   much it missed.

Nothing here imports Lightning. Calibration never runs the user's network, so neither its weights, its BatchNorm
statistics nor the random state change.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map
from torchmetrics import Metric, MetricCollection

from fx_lightning.deploy.export import Artifact
from fx_lightning.deploy.flow import ArtifactReport, check_in_runtimes, failed_path, padded_rows
from fx_lightning.deploy.formats.base import first_line
from fx_lightning.verify.verifier import GetInput, GetTarget, default_get_input, default_get_target, preserved_rng

SUFFIX = "-int8"

__all__ = [
    "BACKENDS",
    "INT8_FORMATS",
    "Int8Backend",
    "Int8Options",
    "Int8Quantizer",
    "conform_batches",
    "int8_options",
    "int8_path",
    "quantize_artifacts",
    "read_batches",
]


class Int8Quantizer(Protocol):
    """One float artifact's int8 maker, calibrated once on the calibration inputs.

    Attributes:
        layers: the quantizable layers, by the names ``write`` and ``sensitivity`` use.
        notes: what the user should know about how it was made.
        calibration_s: seconds the first ``write`` spent calibrating.
    """

    layers: list[str]
    notes: list[str]
    calibration_s: float

    @property
    def num_samples(self) -> int:
        """Calibration samples seen."""
        ...

    def facts(self) -> dict[str, Any]:
        """How it quantizes (calibration method, weight range, ...), for the report."""
        ...

    def label(self, layer: str) -> str:
        """The layer as users know it (its module path)."""
        ...

    def write(self, path: Path, float_layers: Sequence[str] = ()) -> Path:
        """Quantize every layer but ``float_layers`` into ``path``."""
        ...

    def sensitivity(self) -> list[tuple[str, float]]:
        """Each layer's error quantized alone on the calibration inputs, most sensitive first."""
        ...

    def close(self) -> None:
        """Remove working files."""
        ...


@dataclass(frozen=True)
class Int8Backend:
    """How int8 versions of one float format are made.

    Attributes:
        format: the float format it quantizes (the int8 artifact is ``format + "-int8"``).
        how: what the runtime description gains, e.g. ``"int8 QDQ"``.
        check: raises (a missing extra, no C++ compiler) when it cannot run here.
        make: ``make(base, fused, inputs, calibration, options) -> Int8Quantizer`` for the float artifact ``base``.
    """

    format: str
    how: str
    check: Callable[[], None]
    make: Callable[[Artifact, nn.Module, tuple[Any, ...], list[tuple[Any, ...]], Int8Options], Int8Quantizer]


@dataclass(frozen=True)
class Int8Options:
    """What int8 artifacts to make and the budget they must meet.

    Attributes:
        formats: float formats to make int8 versions of: ``"onnx"`` (ONNX Runtime static QDQ quantization) and
            ``"aoti"`` (torchao's PT2E flow with the x86 Inductor quantizer, compiled by AOTInductor; needs the
            ``torchao`` extra and a C++ compiler). The int8 artifact is ``"<format>-int8"``.
        calibration_batches: training batches the activation ranges are calibrated on.
        max_metric_drop: the largest allowed ``|metric_int8 - metric_original|`` (absolute) of each metric value.
        max_float_layers: the most layers kept in float when the int8 artifact is over budget (``0``: none).
        calibration_method: ``"minmax"`` (default), ``"entropy"``, ``"percentile"`` or ``"distribution"``
            (ONNX Runtime's calibrators).
    """

    formats: tuple[str, ...] = ("onnx",)
    calibration_batches: int = 8
    max_metric_drop: float = 0.01
    max_float_layers: int = 4
    calibration_method: str = "minmax"

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON data."""
        return {
            "formats": list(self.formats),
            "calibration_batches": self.calibration_batches,
            "max_metric_drop": self.max_metric_drop,
            "max_float_layers": self.max_float_layers,
            "calibration_method": self.calibration_method,
        }


def int8_options(value: Int8Options | Mapping[str, Any] | None, owner: str) -> Int8Options | None:
    """``value`` as :class:`Int8Options` (``None`` stays ``None``), after checking every field and that the
    formats' extras are installed.

    Args:
        value: an :class:`Int8Options`, a dict of its fields (e.g. from YAML), or ``None`` for no int8.
        owner: what was called, for error messages (``"FuseOnExport"``).

    Raises:
        TypeError: if ``value`` or a field has the wrong type.
        ValueError: for an unknown key, format or calibration method, or a value out of range.
        fx_lightning.deploy.formats.MissingExtraError: if a format's extra is not installed.

    Example:
        >>> int8_options({"max_metric_drop": 0.02}, "FuseOnExport").max_metric_drop
        0.02
    """
    if value is None or isinstance(value, Int8Options):
        options = value
    elif isinstance(value, Mapping):
        known = list(Int8Options.__dataclass_fields__)
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(
                f"{owner}(int8={dict(value)!r}) has unknown key(s) {unknown}. It accepts {known}, e.g. "
                "int8={'formats': ['onnx'], 'max_metric_drop': 0.01}."
            )
        fields = dict(value)
        if "formats" in fields:
            formats = fields["formats"]
            if isinstance(formats, str) or not isinstance(formats, Sequence):
                raise TypeError(
                    f"{owner}(int8={{'formats': {formats!r}}}) expects a list of format names from "
                    f"{list(INT8_FORMATS)}, e.g. ['onnx']."
                )
            fields["formats"] = tuple(formats)
        options = Int8Options(**fields)
    else:
        raise TypeError(
            f"{owner}(int8={value!r}) expects a dict of int8 options (or an Int8Options), got "
            f"{type(value).__name__}. Pass e.g. int8={{'formats': ['onnx'], 'max_metric_drop': 0.01}}."
        )
    if options is None:
        return None
    _check_fields(options, owner)
    return options


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

    Returns:
        ``"<format>-int8"`` -> its :class:`~fx_lightning.deploy.export.Artifact` (``tolerance`` = the budget, ``base`` =
        the float format, ``details["int8"]`` = calibration time, layers kept in float, every attempt), to pass
        to :func:`fx_lightning.deploy.flow.verify_artifacts` with the float ones. One that could not be made
        carries its ``error``; one over budget is the last attempt, which that check fails.

    Raises:
        ValueError: if no calibration input could be read.
    """
    inputs = tuple(example_inputs)
    with preserved_rng():  # reading a DataLoader draws its seed from torch's generator
        calibration_inputs = _calibration_inputs(calibration, options.calibration_batches, get_input, inputs)
    if not calibration_inputs:
        raise ValueError(
            "quantize_artifacts(calibration=...) gave no batches: int8 calibration needs training batches. Pass "
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
        gate = _Gate(name, base, options, original, fused, batches, inputs, metric, get_input, get_target, max_batches)
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


def read_batches(batches: Iterable[Any], count: int) -> list[Any]:
    """The first ``count`` batches, read once. A shuffling DataLoader draws from its own generator
    (``DataLoader(generator=...)``, its sampler's), which is put back as found, so that the user's next epoch
    shuffles as it would have; the global generators are the caller's to keep (``preserved_rng``).

    Example:
        >>> loader = torch.utils.data.DataLoader(range(10), shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> state = loader.generator.get_state()
        >>> len(read_batches(loader, 2)), torch.equal(state, loader.generator.get_state())
        (2, True)
    """
    candidates = (getattr(batches, "generator", None), getattr(getattr(batches, "sampler", None), "generator", None))
    generators = list({id(g): g for g in candidates if isinstance(g, torch.Generator)}.values())
    states = [g.get_state() for g in generators]
    try:
        return list(itertools.islice(batches, count))
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _calibration_inputs(
    calibration: Iterable[Any], count: int, get_input: GetInput, example: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    """The positional inputs of the first ``count`` batches, on the CPU, floating tensors in the example's dtype."""
    dtype = next((t.dtype for t in tree_leaves(example) if isinstance(t, Tensor) and t.is_floating_point()), None)
    taken: list[tuple[Any, ...]] = []
    for batch in read_batches(calibration, count):
        x = get_input(batch)
        args = x if isinstance(x, tuple) else (x,)
        taken.append(
            tree_map(
                lambda t: (
                    (t.detach().cpu().to(dtype) if dtype is not None and t.is_floating_point() else t.cpu())
                    if isinstance(t, Tensor)
                    else t
                ),
                args,
            )
        )
    return taken


def _onnx_quantizer(
    base: Artifact, fused: nn.Module, inputs: tuple[Any, ...], calibration: list[tuple[Any, ...]], options: Int8Options
) -> Int8Quantizer:
    from fx_lightning.deploy.int8.onnx import OnnxQuantizer

    return OnnxQuantizer(base.path, calibration, options.calibration_method)


def _check_onnx() -> None:
    from fx_lightning.deploy.int8.onnx import import_quantization

    import_quantization()


def _pt2e_quantizer(
    base: Artifact, fused: nn.Module, inputs: tuple[Any, ...], calibration: list[tuple[Any, ...]], options: Int8Options
) -> Int8Quantizer:
    from fx_lightning.deploy.int8.pt2e import Pt2eQuantizer

    return Pt2eQuantizer(
        fused,
        inputs,
        calibration,
        dynamic_batch=base.batch_size is None,
        inductor_configs=dict(base.options.get("inductor_configs") or {}),
    )


def _check_pt2e() -> None:
    from fx_lightning.deploy.formats.aoti import find_compiler
    from fx_lightning.deploy.int8.pt2e import import_torchao

    import_torchao()
    find_compiler()


#: float format -> how its int8 version is made; ``INT8_FORMATS`` are its keys.
BACKENDS: dict[str, Int8Backend] = {
    "onnx": Int8Backend("onnx", "int8 QDQ", _check_onnx, _onnx_quantizer),
    "aoti": Int8Backend("aoti", "int8 PT2E x86 Inductor", _check_pt2e, _pt2e_quantizer),
}
#: The float formats an int8 version can be made of; ``<format>-int8`` names the int8 artifact.
INT8_FORMATS = tuple(BACKENDS)


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
        size = next((t.shape[0] for t in tree_leaves(args) if isinstance(t, Tensor) and t.dim() > 0), batch_size)
        for start in range(0, size - batch_size + 1, batch_size) if size >= batch_size else [0]:
            conformed.append(tree_map(lambda t, s=start: padded_rows(t, s, batch_size), args))
    return conformed


def _check_fields(options: Int8Options, owner: str) -> None:
    """Raise for a field of the wrong type or out of range, an unknown format, or a missing extra."""
    where = f"{owner}(int8=...)"
    unknown = [f for f in options.formats if f not in INT8_FORMATS]
    if not options.formats or unknown or not all(isinstance(f, str) for f in options.formats):
        raise ValueError(
            f"{where}: formats={list(options.formats)!r} names no int8 format or unknown ones {unknown}. int8 "
            f"versions can be made of {list(INT8_FORMATS)}, e.g. 'formats': ['onnx']."
        )
    for key in ("calibration_batches", "max_float_layers"):
        value = getattr(options, key)
        lowest = 1 if key == "calibration_batches" else 0
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{where}: {key}={value!r} expects an integer >= {lowest}, got {type(value).__name__}.")
        if value < lowest:
            raise ValueError(f"{where}: {key}={value!r} expects an integer >= {lowest}.")
    drop = options.max_metric_drop
    if not isinstance(drop, (int, float)) or isinstance(drop, bool):
        raise TypeError(
            f"{where}: max_metric_drop={drop!r} expects a number (the largest allowed absolute change of the metric), "
            f"got {type(drop).__name__}."
        )
    if not (drop >= 0 and math.isfinite(drop)):
        raise ValueError(
            f"{where}: max_metric_drop={drop!r} expects a finite number >= 0, the largest allowed absolute change of "
            "the metric (0.01 is one accuracy point)."
        )
    from fx_lightning.deploy.int8.onnx import METHODS

    if not isinstance(options.calibration_method, str) or options.calibration_method not in METHODS:
        raise ValueError(
            f"{where}: calibration_method={options.calibration_method!r} is not one of {list(METHODS)} (ONNX "
            "Runtime's calibrators; torchao's PT2E flow calibrates min/max)."
        )
    for fmt in options.formats:
        try:
            BACKENDS[fmt].check()
        except (ModuleNotFoundError, RuntimeError) as err:
            raise type(err)(f"{where} with formats={list(options.formats)!r}: {err}") from err

"""Deploy artifacts checked where they run: the task metric in each runtime, latency beside it, one report.

:func:`verify_artifacts` loads every written artifact back in the runtime that will run it (``torch.export.load``,
ONNX Runtime at the level it is deployed with, ``aoti_load_package``, a strict ``load_state_dict``) and runs it
over the verification data in one pass, with the torchmetrics comparison :mod:`~fx_lightning.verify` makes for the
fused network: each artifact against the original network, same metric, same tolerance. It then times the
artifacts and both eager networks on the example batch (:func:`fx_lightning.verify.latency.measure_latency`). An
artifact that fails is renamed so that its name says so (``model.FAILED.onnx``) and a warning names it with its
figures (an error with ``strict=True``). :func:`export_and_verify` writes and checks in one call.

The report, :meth:`DeployReport.to_dict`, is what ``fuse_report.json`` holds under ``"artifacts"``::

    {"artifacts": {"onnx": {"path": "out/model.onnx", "runtime": "onnxruntime 1.20.1 CPU, ORT_ENABLE_ALL",
                            "verification": {"metric_original": {...}, "metric_artifact": {...},
                                             "max_abs_diff": 1.2e-06, "num_samples": 360, "passed": true, ...},
                            "latency_ms": 0.41, "latency_ratio": 0.35, "seconds": 1.9, "error": null, "notes": []},
                   ...},
     "eager": {"unfused": {"latency_ms": 1.17, "latency_ratio": 1.0}, "fused": {...}},
     "latency": {"threads": 2, "batch_size": 8, "budget_s": 1.0, "rounds": 40}}

Nothing here imports Lightning.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from torchmetrics import Metric, MetricCollection

from fx_lightning.deploy.export import Artifact, ExportOptions, write_artifacts
from fx_lightning.deploy.formats import Runner, registered_exporters
from fx_lightning.deploy.formats.base import first_line
from fx_lightning.deploy.table import deploy_table
from fx_lightning.verify.latency import measure_latency
from fx_lightning.verify.verifier import (
    GetInput,
    GetTarget,
    VerificationResult,
    Verifier,
    call_with_input,
    check_metric,
    check_tolerance,
    default_get_input,
    default_get_target,
    eval_mode,
    preserved_rng,
)

if TYPE_CHECKING:
    from fx_lightning.deploy.int8.quantize import Int8Options

FAILED_MARK = "FAILED"

#: Maps a network (a module, or an artifact loaded as a function) to a function of a batch's input whose output
#: the metric scores (see :func:`verify_artifacts`'s ``through``).
Through = Callable[[Any], Runner]

__all__ = [
    "ArtifactMismatchWarning",
    "ArtifactReport",
    "DeployReport",
    "deploy_table",
    "export_and_verify",
    "failed_path",
    "verify_artifacts",
]


class ArtifactMismatchWarning(UserWarning):
    """An artifact computes something else in its runtime than the original network; it was not announced."""


@dataclass
class ArtifactReport:
    """How one artifact fared in its runtime.

    Attributes:
        format: the format name.
        path: where the artifact is now (renamed to ``<stem>.FAILED<suffix>`` when it failed).
        runtime: what ran it.
        verification: the comparison with the original network over the verification data (``metric_fused``
            holds the artifact's metric), or ``None`` when the artifact could not be loaded or run.
        latency_ms: median latency on the example batch, or ``None`` when not measured.
        latency_ratio: latency relative to the unfused eager network (median of per-round ratios).
        seconds: time to write it, load it back and verify it.
        error: why it could not be loaded or run, or ``""``.
        notes: what the user should know (a fixed batch size verified in chunks, ...).
        base: the artifact of the same runtime this one derives from (``"onnx"`` for ``"onnx-int8"``), or ``None``.
        latency_ratio_base: latency relative to ``base``'s (median of per-round ratios), or ``None``.
        details: facts about how it was made (``{"int8": {...}}``), reported with it.
    """

    format: str
    path: Path
    runtime: str
    verification: VerificationResult | None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    seconds: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)
    base: str | None = None
    latency_ratio_base: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether it loaded, ran and passed verification."""
        return not self.error and self.verification is not None and self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        """The artifact's entry of the report's ``"artifacts"`` (plain JSON data)."""
        v = self.verification
        verification: dict[str, Any] = {
            "metric_original": dict(v.metric_original) if v else {},
            "metric_artifact": dict(v.metric_fused) if v else {},
            "max_abs_diff": _finite(v.max_abs_diff) if v else None,
            "max_rel_diff": _finite(v.max_rel_diff) if v else None,
            "compared": v.compared if v else None,
            "num_samples": v.num_samples if v else 0,
            "passed": self.passed,
            "tolerance": v.tolerance if v else None,
            "output_tolerance": v.output_tolerance if v else None,
            "top1_agreement": v.top1_agreement if v else None,
            "metric_drop": {k: value - v.metric_fused.get(k, math.nan) for k, value in v.metric_original.items()}
            if v
            else {},
        }
        entry = {
            "path": str(self.path),
            "runtime": self.runtime,
            "verification": verification,
            "latency_ms": self.latency_ms,
            "latency_ratio": self.latency_ratio,
            "seconds": self.seconds,
            "error": self.error or None,
            "notes": [*self.notes, *(v.notes if v else [])],
        }
        if self.base is not None:
            entry["base"] = self.base
            entry["latency_ratio_base"] = self.latency_ratio_base
        return entry | self.details

    def failure(self) -> str:
        """One sentence naming the artifact and the figures that failed it ("" when it passed)."""
        if self.passed:
            return ""
        where = f"the '{self.format}' artifact {self.path} (run by {self.runtime})"
        if self.error or self.verification is None:
            return f"{where} could not be checked: {self.error}"
        v = self.verification
        figures = []
        for name, value in v.metric_original.items():
            diff = abs(v.metric_fused.get(name, math.nan) - value)
            missed = f", missed by {diff - v.tolerance:.3g}" if diff > v.tolerance else ""
            figures.append(
                f"{name} original {value:.6g}, artifact {v.metric_fused.get(name, math.nan):.6g} "
                f"(|diff| {diff:.3g}, tolerance {v.tolerance:g}{missed})"
            )
        figures.append(
            f"max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g}"
            + (f" (tolerance {v.output_tolerance:g}, relative)" if v.output_tolerance is not None else "")
        )
        if v.varying and not v.metric_original:
            figures.append(f"compared: {v.compared}")
        summary = (self.details.get("int8") or {}).get("summary")
        if summary:
            figures.append(f"int8: {summary}")
        return f"{where} failed verification over {v.num_samples} samples: {'; '.join(figures)}"


@dataclass
class DeployReport:
    """Every artifact's check, the eager networks' latency, and how latency was measured.

    Attributes:
        artifacts: format -> :class:`ArtifactReport`, in the order written.
        eager: ``{"unfused": {"latency_ms", "latency_ratio"}, "fused": {...}}`` (values ``None`` when not timed).
        threads: ``torch.get_num_threads()`` during timing.
        batch_size: the example batch's size (``None`` when the inputs have no batch dimension).
        budget_s: the timing budget.
        rounds: timed rounds.
    """

    artifacts: dict[str, ArtifactReport]
    eager: dict[str, dict[str, float | None]]
    threads: int
    batch_size: int | None
    budget_s: float
    rounds: int = 0

    @property
    def passed(self) -> bool:
        """Whether every artifact passed."""
        return all(a.passed for a in self.artifacts.values())

    def announced(self) -> dict[str, Path]:
        """The paths of the artifacts that passed: the ones to hand to users."""
        return {fmt: a.path for fmt, a in self.artifacts.items() if a.passed}

    def failures(self) -> list[str]:
        """One sentence per artifact that failed, naming it and its figures."""
        return [a.failure() for a in self.artifacts.values() if not a.passed]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data: ``{"artifacts": {...}, "eager": {...}, "latency": {...}}``."""
        return {
            "artifacts": {fmt: a.to_dict() for fmt, a in self.artifacts.items()},
            "eager": {k: dict(v) for k, v in self.eager.items()},
            "latency": {
                "threads": self.threads,
                "batch_size": self.batch_size,
                "budget_s": self.budget_s,
                "rounds": self.rounds,
            },
        }

    def table(self) -> str:
        """The deploy table (format, runtime, metric, max abs diff, passed, latency, ratio) as plain text."""
        return deploy_table(self.to_dict())

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------- verification


def verify_artifacts(
    artifacts: Mapping[str, Artifact | str | Path],
    original: nn.Module,
    fused: nn.Module,
    batches: Iterable[Any],
    example_inputs: Sequence[Any],
    *,
    metric: Metric | MetricCollection | None = None,
    tolerance: float = 1e-3,
    output_tolerance: float | None = None,
    max_batches: int | None = None,
    get_input: GetInput = default_get_input,
    get_target: GetTarget = default_get_target,
    latency_budget_s: float | None = 1.0,
    strict: bool = False,
    through: Through | None = None,
) -> DeployReport:
    """Check every artifact in the runtime that will run it, with the task metric, and time it.

    Each artifact is loaded back (:meth:`fx_lightning.deploy.export.Artifact.load`) and run over ``batches`` in one pass
    beside the original network (which runs once per batch), each with a :class:`fx_lightning.verify.verifier.Verifier`:
    the same metric and tolerance as the fused network's verification. An artifact written with a fixed batch
    size is run in chunks of that size (the last one padded). Then the artifacts and both eager networks are
    timed on the example inputs (interleaved rounds within ``latency_budget_s``, the current thread count).
    Everything runs on the calling process: under ``torch.distributed`` the metrics are not synchronised, so call
    it on one process (the one that wrote the artifacts) with the data to check them on.

    An artifact that cannot be loaded, fails on the data or misses the tolerance is renamed to
    ``<stem>.FAILED<suffix>`` (:func:`failed_path`), left out of :meth:`DeployReport.announced`, and named with its
    figures in an :class:`ArtifactMismatchWarning`, or in a ``RuntimeError`` after all are checked with
    ``strict=True``.

    Args:
        artifacts: format -> the :class:`~fx_lightning.deploy.Artifact` :func:`~fx_lightning.deploy.write_artifacts`
            returned (or a path, for a registered format written with dynamic batch or checked on batches of its
            size). An ``Artifact`` with ``runner=`` adds any other artifact (e.g. a checkpoint reloaded by the caller).
        original: the network before fusion: the reference of the metric and of the latency ratio.
        fused: the fused network the artifacts were written from (the ``weights`` format loads into a copy of it).
        batches: the verification data, e.g. a validation DataLoader (iterated once).
        example_inputs: the positional inputs the artifacts were written with; timing runs on them.
        metric: the task metric; ``None`` chooses one from outputs and targets (:func:`fx_lightning.verify.verify`).
        tolerance: the largest allowed ``|artifact - original|`` of each metric value.
        output_tolerance: if given, the largest allowed absolute difference between outputs.
        max_batches: stop after this many batches; ``None`` for all.
        get_input: maps a batch to the network input.
        get_target: maps a batch to the metric target.
        latency_budget_s: wall time for the timing rounds; ``None`` or ``0`` skips timing.
        strict: raise instead of warning when an artifact fails.
        through: maps a network (the original, or an artifact loaded as a function) to what the metric scores on
            a batch's input, e.g. the LightningModule's forward with the network replaced by it, for a network that
            does not take the batch's input or return what the metric takes (a ``ModelOutput`` whose ``logits``
            the forward returns, a detector called on ``list(images)``); ``None``: the network itself.

    Returns:
        The :class:`DeployReport`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range, an artifact's format is unknown, or ``batches`` is empty.
        RuntimeError: with ``strict=True``, if an artifact fails (after every one is checked and renamed).

    Example:
        >>> import tempfile
        >>> from fx_lightning import fuse
        >>> from fx_lightning.deploy.export import write_artifacts
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> fused = fuse(net, (data[0][0],))
        >>> written = write_artifacts(fused, (data[0][0],), tempfile.mkdtemp(), ["pt2", "weights"])
        >>> report = verify_artifacts(written, net, fused, data, (data[0][0],), latency_budget_s=0.05)
        >>> report.passed, report.artifacts["pt2"].verification.num_samples
        (True, 32)
    """
    items = _validate_verify(artifacts, original, fused, batches, example_inputs, metric, max_batches, strict)
    tolerance = check_tolerance("verify_artifacts", "tolerance", tolerance)
    if output_tolerance is not None:
        output_tolerance = check_tolerance("verify_artifacts", "output_tolerance", output_tolerance)
    budget = _check_budget(latency_budget_s)
    inputs = tuple(example_inputs)
    reports, loaded = check_in_runtimes(
        items,
        original,
        fused,
        batches,
        inputs,
        metric=metric,
        tolerance=tolerance,
        output_tolerance=output_tolerance,
        get_input=get_input,
        get_target=get_target,
        max_batches=max_batches,
        through=through,
    )
    deploy = DeployReport(
        artifacts=reports,
        eager={
            "unfused": {"latency_ms": None, "latency_ratio": None},
            "fused": {"latency_ms": None, "latency_ratio": None},
        },
        threads=torch.get_num_threads(),
        batch_size=_batch_of(inputs),
        budget_s=budget,
    )
    if budget > 0:
        _time(deploy, original, fused, loaded, inputs, budget)
    failures = _rename_failed(deploy)
    if failures and strict:
        raise RuntimeError(
            f"verify_artifacts(strict=True): {len(failures)} artifact(s) failed and were renamed, not announced: "
            + " | ".join(failures)
            + ". Check the runtime's options (e.g. the ONNX Runtime optimisation level), or loosen the tolerance."
        )
    for message in failures:
        warnings.warn(message, ArtifactMismatchWarning, stacklevel=2)
    return deploy


def check_in_runtimes(
    items: Mapping[str, Artifact],
    original: nn.Module,
    fused: nn.Module,
    batches: Iterable[Any],
    inputs: tuple[Any, ...],
    *,
    metric: Metric | MetricCollection | None,
    tolerance: float,
    output_tolerance: float | None,
    get_input: GetInput,
    get_target: GetTarget,
    max_batches: int | None,
    through: Through | None = None,
) -> tuple[dict[str, ArtifactReport], dict[str, Runner]]:
    """Load every artifact in its runtime and verify it over ``batches`` in one pass (arguments already checked):
    the reports, and the loaded runners for timing. Nothing is renamed, warned about or timed.

    An artifact with its own ``tolerance`` (an int8 budget) is held to it on the metric, and not to
    ``output_tolerance``; without a task metric it fails (its outputs alone prove nothing).
    """
    with torch.no_grad(), eval_mode(fused):
        spec = tree_flatten(fused(*_like_module(inputs, fused)))[1]
    reports: dict[str, ArtifactReport] = {}
    loaded: dict[str, Runner] = {}  # as the runtime runs them: timed on the example inputs
    runners: dict[str, Runner] = {}  # fed any verification batch
    for fmt, artifact in items.items():
        start = time.perf_counter()
        report = ArtifactReport(
            fmt,
            artifact.path,
            artifact.runtime or fmt,
            None,
            seconds=artifact.seconds,
            base=artifact.base,
            details=dict(artifact.details),
            notes=list(artifact.notes),
        )
        if artifact.error:
            report.error = artifact.error
            reports[fmt] = report
            continue
        try:
            loaded[fmt] = artifact.load(fused, spec)
            runners[fmt] = _conformed(loaded[fmt], inputs, artifact.batch_size, report.notes)
            if through is not None:
                runners[fmt] = through(runners[fmt])
        except Exception as err:  # noqa: BLE001 - any loader failure fails this artifact, not the others
            report.error = f"loading it failed: {type(err).__name__}: {first_line(err)}"
        report.seconds += time.perf_counter() - start
        reports[fmt] = report

    verifiers = {
        fmt: Verifier(
            metric.clone() if metric is not None else None,
            tolerance if items[fmt].tolerance is None else items[fmt].tolerance,
            get_input,
            get_target,
            output_tolerance=output_tolerance if items[fmt].tolerance is None else None,
        )
        for fmt in runners
    }
    reference = original if through is None else through(original)
    _verification_pass(reference, runners, verifiers, reports, batches, get_input, max_batches)
    for fmt, verifier in verifiers.items():
        if not reports[fmt].error:
            start = time.perf_counter()
            reports[fmt].verification = _on_this_process(verifier).compute()
            reports[fmt].seconds += time.perf_counter() - start
            if items[fmt].tolerance is not None and not reports[fmt].verification.metric_original:
                # its own budget is a metric budget: outputs alone (int8 logits move by far more) prove nothing
                reports[fmt].error = (
                    "no task metric was computed on the verification data (no targets, or no metric given), and "
                    f"its budget ({items[fmt].tolerance:g}) is on the metric: pass metric=... and batches with targets"
                )
    return reports, loaded


def export_and_verify(
    original: nn.Module,
    fused: nn.Module,
    example_inputs: Sequence[Any],
    directory: str | Path,
    batches: Iterable[Any],
    formats: Sequence[str] = ("pt2", "weights"),
    *,
    name: str = "model",
    dynamic_batch: bool = False,
    options: ExportOptions | None = None,
    int8: Int8Options | Mapping[str, Any] | None = None,
    calibration: Iterable[Any] | None = None,
    artifacts: Mapping[str, Artifact] | None = None,
    keep_going: bool = False,
    **verify_kwargs: Any,
) -> DeployReport:
    """:func:`~fx_lightning.deploy.export.write_artifacts` then :func:`verify_artifacts`: write, check, time, report.

    Args:
        original: the network before fusion.
        fused: the fused network to write.
        example_inputs: positional inputs for one forward call (the artifacts' shapes; timing runs on them).
        directory: where to write.
        batches: the verification data.
        formats: the formats to write (see :func:`fx_lightning.deploy.formats.registered_exporters`).
        name: file name stem.
        dynamic_batch: export the traced formats with a dynamic batch dimension.
        options: per-format options, e.g. ``{"onnx": {"optimization_level": "basic"}}``.
        int8: int8 versions to make of the float artifacts, checked against their own metric budget
            (:class:`~fx_lightning.deploy.int8.quantize.Int8Options` or a dict of its fields, e.g.
            ``{"formats": ["onnx"], "max_metric_drop": 0.01}``); each one's float format is written too.
            ``None``: no int8.
        calibration: the batches int8 calibrates on (the training data); required with ``int8``.
        artifacts: artifacts the caller made itself, checked and timed with the written ones, after them (an
            :class:`~fx_lightning.deploy.export.Artifact` with ``runner=``, e.g. a checkpoint it reloaded).
        keep_going: an int8 version that cannot be made (its calibration data cannot be read, its quantizer
            fails) fails only the int8 artifacts, with the reason as their ``error``, instead of raising.
        **verify_kwargs: :func:`verify_artifacts`'s keyword arguments (``metric``, ``tolerance``, ``strict``, ...).

    Returns:
        The :class:`DeployReport`.

    Example:
        >>> import tempfile
        >>> from fx_lightning import fuse
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3)).eval()
        >>> data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
        >>> x = data[0][0]
        >>> report = export_and_verify(net, fuse(net, (x,)), (x,), tempfile.mkdtemp(), data, latency_budget_s=0.05)
        >>> sorted(report.announced()), report.artifacts["weights"].verification.num_samples
        (['pt2', 'weights'], 24)
    """
    from fx_lightning.deploy.int8.quantize import (  # it builds on this module
        SUFFIX,
        int8_options,
        quantize_artifacts,
        unmade,
    )

    int8_wanted = int8_options(int8, "export_and_verify")
    if int8_wanted is not None:
        if calibration is None or isinstance(calibration, (Tensor, Mapping)) or not isinstance(calibration, Iterable):
            raise TypeError(
                f"export_and_verify(int8=..., calibration={type(calibration).__name__}) needs the batches to "
                "calibrate on: pass calibration=<the training DataLoader or a list of batches>."
            )
        formats = [*formats, *(f for f in int8_wanted.formats if f not in formats)]
        if isinstance(batches, Iterator):  # checked once per int8 attempt, then once more with the float artifacts
            batches = list(batches)
    written = write_artifacts(  # a format that cannot represent the network fails alone, with the reason
        fused,
        example_inputs,
        directory,
        formats,
        name=name,
        dynamic_batch=dynamic_batch,
        options=options,
        keep_going=True,
    )
    if int8_wanted is not None:
        keys = ("metric", "get_input", "get_target", "max_batches")
        try:
            written |= quantize_artifacts(
                written,
                original,
                fused,
                calibration,
                batches,
                example_inputs,
                int8_wanted,
                **{k: v for k, v in verify_kwargs.items() if k in keys},
            )
        except Exception as err:
            if not keep_going:
                raise
            error = f"int8 could not be made: {type(err).__name__}: {err}"
            written |= {f + SUFFIX: unmade(f, written.get(f), error) for f in int8_wanted.formats}
    written |= dict(artifacts or {})
    return verify_artifacts(written, original, fused, batches, example_inputs, **verify_kwargs)


def failed_path(path: str | Path) -> Path:
    """The name a failed artifact is kept under: ``FAILED`` before the last suffix.

    Example:
        >>> failed_path("out/model.onnx").name, failed_path("out/model.aoti.pt2").name
        ('model.FAILED.onnx', 'model.aoti.FAILED.pt2')
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.{FAILED_MARK}{path.suffix}")


def _verification_pass(
    original: nn.Module | Runner,
    runners: Mapping[str, Runner],
    verifiers: Mapping[str, Verifier],
    reports: Mapping[str, ArtifactReport],
    batches: Iterable[Any],
    get_input: GetInput,
    max_batches: int | None,
) -> None:
    """One pass over the data: the original network once per batch, every artifact beside it."""
    live = dict(runners)
    seen = 0
    with preserved_rng():
        for batch in batches:
            reference = _reference_output(original, get_input(batch))

            def cached(*args: Any, **kwargs: Any) -> Any:
                return reference

            for fmt in list(live):
                start = time.perf_counter()
                try:
                    verifiers[fmt].update(cached, live[fmt], batch)
                except Exception as err:  # noqa: BLE001 - an artifact failing on the data fails that artifact only
                    reports[
                        fmt
                    ].error = f"running it on verification batch {seen} failed: {type(err).__name__}: {first_line(err)}"
                    del live[fmt]
                reports[fmt].seconds += time.perf_counter() - start
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    if seen == 0:
        raise ValueError(
            "verify_artifacts(batches=...) got no batches. Pass a non-empty DataLoader or list of batches."
        )


def _on_this_process(verifier: Verifier) -> Verifier:
    """The verifier with its metrics kept local: artifacts are written and checked by one process (global rank
    zero), and a synchronising ``compute()`` there would wait forever for the others."""
    for module in verifier.modules():
        if isinstance(module, Metric):
            module.distributed_available_fn = _not_distributed
    return verifier


def _not_distributed() -> bool:
    return False


def _reference_output(original: nn.Module | Runner, inputs: Any) -> Any:
    """The original network's output, as :class:`fx_lightning.verify.verifier.Verifier` computes it (eval, no grad)."""
    if not isinstance(original, nn.Module):  # a function (``through``) that puts the network in place itself
        with torch.no_grad():
            return call_with_input(original, inputs)
    inputs = _like_module(inputs, original)
    with torch.no_grad(), eval_mode(original):
        return call_with_input(original, inputs)


def _like_module(inputs: Any, module: nn.Module) -> Any:
    """Floating inputs cast to the module's floating dtype, every tensor moved to its device."""
    param = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    if param is None:
        return inputs
    return tree_map(
        lambda t: (
            (t.to(param.device, param.dtype) if t.is_floating_point() else t.to(param.device))
            if isinstance(t, Tensor)
            else t
        ),
        inputs,
    )


def _conformed(runner: Runner, example: tuple[Any, ...], batch_size: int | None, notes: list[str]) -> Runner:
    """``runner`` fed as at export: floating inputs in the example's dtype; with a fixed batch size, other batch
    sizes in chunks of it (the last chunk padded with copies of its last sample, the padding dropped)."""
    dtype = next((t.dtype for t in tree_leaves(example) if isinstance(t, Tensor) and t.is_floating_point()), None)

    def cast(args: tuple[Any, ...]) -> tuple[Any, ...]:
        if dtype is None:
            return args
        return tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, args)

    if batch_size is None:
        return lambda *args: runner(*cast(args))
    if len(example) == 1 and isinstance(example[0], (list, tuple)):
        return _image_lists(runner, cast, batch_size, notes)

    def run(*args: Any) -> Any:
        args = cast(args)
        size = _batch_of(args)
        if size is None or size == batch_size:
            return runner(*args)
        if not notes:
            notes.append(
                f"written with a fixed batch size of {batch_size}: other batch sizes were run in chunks of "
                f"{batch_size} (export with dynamic_batch=True for an artifact that takes any batch size)"
            )
        chunks = []
        for start in range(0, size, batch_size):
            part = tree_map(lambda t, s=start: padded_rows(t, s, batch_size), args)
            taken = min(batch_size, size - start)
            out = runner(*part)
            chunks.append(tree_map(lambda o, n=taken: o[:n] if isinstance(o, Tensor) and o.dim() > 0 else o, out))
        return _concat(chunks)

    return run


def _image_lists(
    runner: Runner, cast: Callable[[tuple[Any, ...]], tuple[Any, ...]], count: int, notes: list[str]
) -> Runner:
    """``runner`` of an artifact traced on a list of ``count`` images (a whole detector), fed lists of any length:
    in chunks of ``count``, the last one padded with copies of its last image, one output per image kept."""

    def run(images: Any) -> Any:
        (images,) = cast((images,))
        images = list(images)
        if len(images) == count:
            return runner(images)
        if not notes:
            notes.append(
                f"written for lists of {count} images: other lists were run in chunks of {count} (the last one padded "
                "with copies of its last image)"
            )
        outputs: list[Any] = []
        for start in range(0, len(images), count):
            part = images[start : start + count]
            taken = len(part)
            out = runner(part + [part[-1]] * (count - taken))
            outputs += list(out)[:taken]
        return outputs

    return run


def padded_rows(t: Any, start: int, size: int) -> Any:
    """Rows ``start:start + size`` of a batched tensor, padded with copies of its last row up to ``size`` (anything
    else as it is): the chunks a fixed-batch artifact runs."""
    if not isinstance(t, Tensor) or t.dim() == 0:
        return t
    part = t[start : start + size]
    missing = size - part.shape[0]
    if missing > 0:
        part = torch.cat([part, part[-1:].expand(missing, *part.shape[1:])])
    return part


def _concat(chunks: list[Any]) -> Any:
    leaves = [tree_flatten(c)[0] for c in chunks]
    merged = [torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0] for parts in zip(*leaves)]
    return tree_unflatten(merged, tree_flatten(chunks[0])[1])


def _batch_of(args: Any) -> int | None:
    if any(isinstance(a, (list, tuple)) for a in (args if isinstance(args, tuple) else (args,))):
        return None  # a list of images is one input, not a batch dimension
    sizes = {t.shape[0] for t in tree_leaves(args) if isinstance(t, Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _time(
    deploy: DeployReport,
    original: nn.Module,
    fused: nn.Module,
    runners: Mapping[str, Runner],
    inputs: tuple[Any, ...],
    budget: float,
) -> None:
    """Median latency of every runnable artifact and both eager networks, side by side."""
    eager_original, eager_fused = _like_module(inputs, original), _like_module(inputs, fused)
    variants = {
        "unfused": lambda: original(*eager_original),
        "fused": lambda: fused(*eager_fused),
    }
    for fmt, runner in runners.items():
        if not deploy.artifacts[fmt].error:
            variants[f"artifact:{fmt}"] = lambda run=runner: run(*inputs)
    with eval_mode(original), eval_mode(fused):
        timings = measure_latency(variants, "unfused", budget_s=budget)
    for key in ("unfused", "fused"):
        deploy.eager[key] = {"latency_ms": timings[key].median_ms, "latency_ratio": timings[key].ratio}
    for fmt, report in deploy.artifacts.items():
        timing = timings.get(f"artifact:{fmt}")
        if timing is not None:
            report.latency_ms, report.latency_ratio = timing.median_ms, timing.ratio
            base = timings.get(f"artifact:{report.base}")
            if base is not None:
                report.latency_ratio_base = timing.ratio_to(base)
    deploy.rounds = timings["unfused"].rounds


def _rename_failed(deploy: DeployReport) -> list[str]:
    """Rename every failed artifact to its FAILED name; one message per failure, naming both names."""
    messages = []
    for report in deploy.artifacts.values():
        target = failed_path(report.path)
        if report.passed:
            if target.exists():  # from an earlier run: it would contradict the artifact that passes now
                target.unlink()
            continue
        message = report.failure()
        if report.path.exists():
            report.path.replace(target)
            report.path = target
            message += f". It is kept as {target} and not announced"
        messages.append(message)
    return messages


def _validate_verify(
    artifacts: Any,
    original: Any,
    fused: Any,
    batches: Any,
    example_inputs: Any,
    metric: Any,
    max_batches: Any,
    strict: Any,
) -> dict[str, Artifact]:
    for label, value in (("original", original), ("fused", fused)):
        if not isinstance(value, nn.Module):
            raise TypeError(
                f"verify_artifacts({label}=...) expects a torch.nn.Module, got {type(value).__name__}. "
                "Pass the original network and the fused one the artifacts were written from."
            )
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"verify_artifacts(batches=...) expects an iterable of batches such as a DataLoader, got "
            f"{type(batches).__name__}. Wrap a single batch in a list: batches=[batch]."
        )
    if isinstance(example_inputs, (Tensor, str)) or not isinstance(example_inputs, Sequence):
        raise TypeError(
            f"verify_artifacts(example_inputs=...) expects a tuple of positional inputs, got "
            f"{type(example_inputs).__name__}. Wrap a single tensor: example_inputs=(x,)."
        )
    check_metric("verify_artifacts", metric)
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(
            f"verify_artifacts(max_batches={max_batches!r}) expects a positive integer or None (all batches)."
        )
    if not isinstance(strict, bool):
        raise TypeError(f"verify_artifacts(strict={strict!r}) expects True or False.")
    if not isinstance(artifacts, Mapping) or not artifacts:
        raise TypeError(
            f"verify_artifacts(artifacts={artifacts!r}) expects a non-empty dict of format -> Artifact (what "
            "write_artifacts returns) or path."
        )
    items: dict[str, Artifact] = {}
    exporters = registered_exporters()
    for fmt, value in artifacts.items():
        if isinstance(value, Artifact):
            items[fmt] = value
            continue
        if not isinstance(value, (str, Path)):
            raise TypeError(
                f"verify_artifacts(artifacts={{{fmt!r}: {value!r}}}) expects an Artifact or a path, got "
                f"{type(value).__name__}."
            )
        if fmt not in exporters:
            raise ValueError(
                f"verify_artifacts(artifacts={{{fmt!r}: ...}}): a path needs a registered format "
                f"({list(exporters)}) to be loaded; pass Artifact({fmt!r}, path, runner=...) for any other."
            )
        options = exporters[fmt].check({})
        items[fmt] = Artifact(fmt, Path(value), runtime=exporters[fmt].runtime(options), options=options)
    return items


def _check_budget(budget: Any) -> float:
    if budget is None:
        return 0.0
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or math.isnan(budget) or budget < 0:
        raise ValueError(
            f"verify_artifacts(latency_budget_s={budget!r}) expects seconds >= 0 (or None to skip timing), "
            "e.g. latency_budget_s=1.0."
        )
    return float(budget)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

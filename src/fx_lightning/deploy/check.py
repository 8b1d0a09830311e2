"""Deploy artifacts checked where they run: the task metric in each runtime, latency beside it, one report.

:func:`verify_artifacts` loads every written artifact back in the runtime that will run it (``torch.export.load``,
ONNX Runtime at the level it is deployed with, ``aoti_load_package``, a strict ``load_state_dict``) and runs it
over the verification data in one pass, with the torchmetrics comparison :mod:`~fx_lightning.verify` makes for the
fused network: each artifact against the original network, same metric, same tolerance. It then times the
artifacts and both eager networks on the example batch (:func:`fx_lightning.verify.latency.measure_latency`). An
artifact that fails is renamed so that its name says so (``model.FAILED.onnx``) and a warning names it with its
figures (an error with ``strict=True``). :func:`fx_lightning.deploy.flow.export_and_verify` writes and checks in
one call.

The report, :meth:`fx_lightning.deploy.report.DeployReport.to_dict`, is what ``fuse_report.json`` holds under
``"artifacts"``::

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torchmetrics import Metric, MetricCollection

from fx_lightning.deploy.export import Artifact, check_example_inputs
from fx_lightning.deploy.formats import Runner, check_options, registered_exporters
from fx_lightning.deploy.report import ArtifactReport, DeployReport
from fx_lightning.errors import first_line
from fx_lightning.trees import batch_size, floating_dtype, like_module, padded_rows, tree_to
from fx_lightning.verify.latency import measure_latency
from fx_lightning.verify.verifier import (
    GetInput,
    GetTarget,
    Verifier,
    call_with_input,
    check_max_batches,
    check_metric,
    check_tolerance,
    default_get_input,
    default_get_target,
    eval_mode,
    preserved_rng,
)

FAILED_MARK = "FAILED"

#: Maps a network (a module, or an artifact loaded as a function) to a function of a batch's input whose output
#: the metric scores (see :func:`verify_artifacts`'s ``through``).
Through = Callable[[Any], Runner]

__all__ = ["ArtifactMismatchWarning", "Through", "check_in_runtimes", "failed_path", "verify_artifacts"]


class ArtifactMismatchWarning(UserWarning):
    """An artifact computes something else in its runtime than the original network; it was not announced."""


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
    owner: str = "verify_artifacts",
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
        owner: the function the user called, which error messages name (``"export_and_verify"`` when it checks
            through this one).

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
    items = _validate_verify(owner, artifacts, original, fused, batches, example_inputs, metric, max_batches, strict)
    tolerance = check_tolerance(owner, "tolerance", tolerance)
    if output_tolerance is not None:
        output_tolerance = check_tolerance(owner, "output_tolerance", output_tolerance)
    budget = _check_budget(owner, latency_budget_s)
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
        owner=owner,
    )
    deploy = DeployReport(
        artifacts=reports,
        eager={
            "unfused": {"latency_ms": None, "latency_ratio": None},
            "fused": {"latency_ms": None, "latency_ratio": None},
        },
        threads=torch.get_num_threads(),
        batch_size=batch_size(inputs),
        budget_s=budget,
    )
    if budget > 0:
        _time(deploy, original, fused, loaded, inputs, budget)
    failures = _rename_failed(deploy)
    if failures and strict:
        raise RuntimeError(
            f"{owner}(strict=True): {len(failures)} artifact(s) failed and were renamed, not announced: "
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
    owner: str = "verify_artifacts",
) -> tuple[dict[str, ArtifactReport], dict[str, Runner]]:
    """Load every artifact in its runtime and verify it over ``batches`` in one pass (arguments already checked):
    the reports, and the loaded runners for timing. Nothing is renamed, warned about or timed.

    An artifact with its own ``tolerance`` (an int8 budget) is held to it on the metric, and not to
    ``output_tolerance``; without a task metric it fails (its outputs alone prove nothing).
    """
    with torch.no_grad(), eval_mode(fused):
        spec = tree_flatten(fused(*like_module(inputs, fused)))[1]
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
    _verification_pass(reference, runners, verifiers, reports, batches, get_input, max_batches, owner)
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
    owner: str,
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
        raise ValueError(f"{owner}(batches=...) got no batches. Pass a non-empty DataLoader or list of batches.")


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
    inputs = like_module(inputs, original)
    with torch.no_grad(), eval_mode(original):
        return call_with_input(original, inputs)


def _conformed(runner: Runner, example: tuple[Any, ...], fixed: int | None, notes: list[str]) -> Runner:
    """``runner`` fed as at export: floating inputs in the example's dtype; with a ``fixed`` batch size, other batch
    sizes in chunks of it (the last chunk padded with copies of its last sample, the padding dropped)."""
    dtype = floating_dtype(example)

    def cast(args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tree_to(args, dtype=dtype)

    if fixed is None:
        return lambda *args: runner(*cast(args))
    if len(example) == 1 and isinstance(example[0], (list, tuple)):
        return _image_lists(runner, cast, fixed, notes)

    def run(*args: Any) -> Any:
        args = cast(args)
        size = batch_size(args)
        if size is None or size == fixed:
            return runner(*args)
        if not notes:
            notes.append(
                f"written with a fixed batch size of {fixed}: other batch sizes were run in chunks of "
                f"{fixed} (export with dynamic_batch=True for an artifact that takes any batch size)"
            )
        chunks = []
        for start in range(0, size, fixed):
            part = tree_map(lambda t, s=start: padded_rows(t, s, fixed), args)
            taken = min(fixed, size - start)
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


def _concat(chunks: list[Any]) -> Any:
    leaves = [tree_flatten(c)[0] for c in chunks]
    merged = [torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0] for parts in zip(*leaves)]
    return tree_unflatten(merged, tree_flatten(chunks[0])[1])


def _time(
    deploy: DeployReport,
    original: nn.Module,
    fused: nn.Module,
    runners: Mapping[str, Runner],
    inputs: tuple[Any, ...],
    budget: float,
) -> None:
    """Median latency of every runnable artifact and both eager networks, side by side."""
    eager_original, eager_fused = like_module(inputs, original), like_module(inputs, fused)
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
    owner: str,
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
                f"{owner}({label}=...) expects a torch.nn.Module, got {type(value).__name__}. "
                "Pass the original network and the fused one the artifacts were written from."
            )
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{owner}(batches=...) expects an iterable of batches such as a DataLoader, got "
            f"{type(batches).__name__}. Wrap a single batch in a list: batches=[batch]."
        )
    check_example_inputs(owner, example_inputs)
    check_metric(owner, metric)
    check_max_batches(owner, "max_batches", max_batches)
    if not isinstance(strict, bool):
        raise TypeError(f"{owner}(strict={strict!r}) expects True or False.")
    if not isinstance(artifacts, Mapping) or not artifacts:
        raise TypeError(
            f"{owner}(artifacts={artifacts!r}) expects a non-empty dict of format -> Artifact (what "
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
                f"{owner}(artifacts={{{fmt!r}: {value!r}}}) expects an Artifact or a path, got {type(value).__name__}."
            )
        if fmt not in exporters:
            raise ValueError(
                f"{owner}(artifacts={{{fmt!r}: ...}}): a path needs a registered format "
                f"({list(exporters)}) to be loaded; pass Artifact({fmt!r}, path, runner=...) for any other."
            )
        options = check_options(exporters[fmt], {}, owner)
        items[fmt] = Artifact(fmt, Path(value), runtime=exporters[fmt].runtime(options), options=options)
    return items


def _check_budget(owner: str, budget: Any) -> float:
    if budget is None:
        return 0.0
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or math.isnan(budget) or budget < 0:
        raise ValueError(
            f"{owner}(latency_budget_s={budget!r}) expects seconds >= 0 (or None to skip timing), "
            "e.g. latency_budget_s=1.0."
        )
    return float(budget)

"""The options of :class:`~fx_lightning.FuseOnExport`: one dataclass, checked when it is built.

:class:`FuseOptions` holds what the callback's constructor takes, with the same names and defaults, and checks
every value before anything is trained (the ranges, the formats and their extras, the per-format options, the int8
options). ``None`` for a list option means its default, written once here (:data:`DEFAULT_STAGES`, ...); after
construction those options are always lists. Errors name ``FuseOnExport(...)`` and the value given, since that is
the call the user wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

from torchmetrics import Metric, MetricCollection

from fx_lightning.deploy.export import MissingExtraError
from fx_lightning.deploy.formats import registered_exporters
from fx_lightning.deploy.int8.options import Int8Options, int8_options
from fx_lightning.lightning.networks import SELF
from fx_lightning.verify.verifier import check_max_batches, check_metric, check_tolerance

Stage = Literal["test", "predict", "validate"]
ExportStage = Literal["fit", "test", "predict", "validate"]
OnMismatch = Literal["revert", "raise", "warn"]

#: The name every error repeats: the call the user wrote.
OWNER = "FuseOnExport"
#: The deploy checkpoint, written next to the other artifacts (see :mod:`fx_lightning.lightning.deploy_checkpoint`).
CHECKPOINT_FORMAT = "ckpt"
STAGES = ("test", "predict", "validate")
EXPORT_STAGES = ("fit", *STAGES)
ON_MISMATCH = ("revert", "raise", "warn")
DEFAULT_STAGES = ("test", "predict")
DEFAULT_EXPORT_FORMATS = ("pt2", "weights", CHECKPOINT_FORMAT)
DEFAULT_EXPORT_STAGES = ("fit", "test")


@dataclass
class FuseOptions:
    """What :class:`~fx_lightning.FuseOnExport` was asked to do; see its docstring for each field.

    Raises:
        ValueError: if a value is out of its range, or ``export_options`` names a format that is not written.
        TypeError: if ``metric``, ``tolerance``, ``export_options`` or ``int8`` has the wrong type.
        fx_lightning.deploy.export.MissingExtraError: if a format of ``export_formats`` lacks its extra.

    Example:
        >>> FuseOptions(stages=["test"]).export_formats
        ['pt2', 'weights', 'ckpt']
        >>> FuseOptions(export_formats=["weights"], int8={"formats": ["onnx"]}).written_formats()
        ['weights', 'onnx']
    """

    attributes: list[str] | None = None
    stages: list[str] | None = None
    fuse_after_fit: bool = True
    verify: bool = True
    metric: Metric | MetricCollection | None = None
    tolerance: float = 1e-3
    on_mismatch: str = "revert"
    max_verify_batches: int | None = None
    verify_dataloader: Iterable[Any] | None = None
    get_input: Callable[[Any], Any] | None = None
    get_target: Callable[[Any], Any] | None = None
    example_input: Any = None
    export_dir: str | None = None
    export_formats: list[str] | None = None
    export_stages: list[str] | None = None
    export_options: dict[str, dict[str, Any]] | None = None
    deploy_latency_budget: float = 1.0
    int8: Int8Options | dict[str, Any] | None = None
    calibration_dataloader: Iterable[Any] | None = None
    dynamic_batch: bool = True
    passes: list[str] | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        _check_attributes(self.attributes)
        self.stages = _choice_list("stages", self.stages, STAGES, DEFAULT_STAGES, "['test']")
        if self.on_mismatch not in ON_MISMATCH:
            raise ValueError(f"{OWNER}(on_mismatch={self.on_mismatch!r}) expects one of {list(ON_MISMATCH)}.")
        check_max_batches(OWNER, "max_verify_batches", self.max_verify_batches)
        self.export_formats = _check_export_formats(self.export_formats)
        self.export_stages = _choice_list(
            "export_stages", self.export_stages, EXPORT_STAGES, DEFAULT_EXPORT_STAGES, "['fit']"
        )
        self.int8 = int8_options(self.int8, OWNER)
        self.export_options = _check_export_options(self.export_options, self.written_formats())
        self.deploy_latency_budget = _check_budget(self.deploy_latency_budget)
        check_metric(OWNER, self.metric)
        self.tolerance = check_tolerance(OWNER, "tolerance", self.tolerance)
        self.attributes = list(self.attributes) if self.attributes is not None else None
        self.passes = list(self.passes) if self.passes is not None else None

    def written_formats(self) -> list[str]:
        """The formats an exporter writes: ``export_formats`` without the deploy checkpoint, then the float formats
        the int8 versions are made of."""
        formats = [f for f in self.export_formats or () if f != CHECKPOINT_FORMAT]
        int8 = self.int8.formats if isinstance(self.int8, Int8Options) else ()
        return formats + [f for f in int8 if f not in formats]

    def exports_after(self, stage: str) -> bool:
        """Whether the fusion before ``stage`` writes the artifacts."""
        return stage in (self.export_stages or ())

    def fuses_before(self, stage: str) -> bool:
        """Whether a fusion runs for the Trainer call ``stage`` (``"fit"``: at its end)."""
        return self.fuse_after_fit if stage == "fit" else stage in (self.stages or ())


#: The option names, in the constructor's order: each is also an attribute of the callback.
OPTION_NAMES = tuple(f.name for f in fields(FuseOptions))


def _check_attributes(attributes: Any) -> None:
    if attributes is not None and (
        isinstance(attributes, str) or not all(isinstance(a, str) and a for a in attributes)
    ):
        raise ValueError(
            f"{OWNER}(attributes={attributes!r}) expects a list of attribute names, e.g. attributes=['net'], "
            f"['{SELF}'] for the LightningModule's own layers, or None to find the networks."
        )


def _choice_list(name: str, value: Any, allowed: tuple[str, ...], default: tuple[str, ...], eg: str) -> list[str]:
    """``value`` as a list drawn from ``allowed`` (``default`` for ``None``)."""
    if value is None:
        return list(default)
    if isinstance(value, str) or any(s not in allowed for s in value):
        raise ValueError(f"{OWNER}({name}={value!r}) expects a list drawn from {list(allowed)}, e.g. {name}={eg}.")
    return list(value)


def _check_export_formats(export_formats: Any) -> list[str]:
    """The formats as a list, each registered (read now: formats registered after import count too) and with its
    extras (and compiler) installed, before anything is trained."""
    exporters = registered_exporters()
    known = [*exporters, CHECKPOINT_FORMAT]
    if export_formats is None:
        export_formats = list(DEFAULT_EXPORT_FORMATS)
    if isinstance(export_formats, str) or any(f not in known for f in export_formats):
        raise ValueError(
            f"{OWNER}(export_formats={export_formats!r}) expects a list drawn from {known}, "
            "e.g. export_formats=['pt2', 'weights', 'ckpt']."
        )
    for fmt in export_formats:
        if fmt == CHECKPOINT_FORMAT:
            continue
        try:
            exporters[fmt].check({})
        except MissingExtraError as err:
            raise MissingExtraError(
                f"{OWNER}(export_formats={export_formats!r}) cannot write {fmt!r} here: {err} Or drop {fmt!r} "
                "from export_formats."
            ) from err
    return list(export_formats)


def _check_export_options(export_options: Any, written: list[str]) -> dict[str, dict[str, Any]]:
    """``export_options`` as ``write_artifacts`` takes it, for formats that are written, each checked by its
    format; a copy, so that the user's dict is never changed."""
    if export_options is None:
        return {}
    if not isinstance(export_options, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in export_options.items()
    ):
        raise TypeError(
            f"{OWNER}(export_options={export_options!r}) expects a dict of per-format option dicts, got "
            f"{type(export_options).__name__}. Pass e.g. export_options={{'onnx': {{'optimization_level': "
            "'basic'}}."
        )
    unused = [f for f in export_options if f not in written]
    if unused:
        raise ValueError(
            f"{OWNER}(export_options={export_options!r}) has options for {unused}, which "
            f"export_formats={written} does not write. Add the format to export_formats or drop its options."
        )
    exporters = registered_exporters()
    for fmt, options in export_options.items():
        try:
            exporters[fmt].check(options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{OWNER}(export_options={export_options!r}): {err}") from err
    return {k: dict(v) for k, v in export_options.items()}


def _check_budget(budget: Any) -> float:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget) or budget < 0:
        raise ValueError(
            f"{OWNER}(deploy_latency_budget={budget!r}) expects seconds >= 0 for timing the artifacts, e.g. "
            "deploy_latency_budget=1.0 (0 skips the timing)."
        )
    return float(budget)

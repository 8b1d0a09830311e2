"""The int8 options: what int8 artifacts to make and the budget they must meet, every field checked up front.

:func:`int8_options` turns what users pass (an :class:`Int8Options`, or a dict of its fields from YAML) into
checked options, naming the function they called in every error, before anything is trained or written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fx_lightning.deploy.int8.backends import BACKENDS


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
                    f"{list(BACKENDS)}, e.g. ['onnx']."
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


def _check_fields(options: Int8Options, owner: str) -> None:
    """Raise for a field of the wrong type or out of range, an unknown format, or a missing extra."""
    where = f"{owner}(int8=...)"
    unknown = [f for f in options.formats if f not in BACKENDS]
    if not options.formats or unknown or not all(isinstance(f, str) for f in options.formats):
        raise ValueError(
            f"{where}: formats={list(options.formats)!r} names no int8 format or unknown ones {unknown}. int8 "
            f"versions can be made of {list(BACKENDS)}, e.g. 'formats': ['onnx']."
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
    backends = BACKENDS.as_dict()
    methods = list(dict.fromkeys(m for backend in backends.values() for m in backend.calibration_methods))
    if not isinstance(options.calibration_method, str) or options.calibration_method not in methods:
        by_format = "; ".join(f"'{name}' calibrates {list(b.calibration_methods)}" for name, b in backends.items())
        raise ValueError(
            f"{where}: calibration_method={options.calibration_method!r} is not one of {methods} ({by_format})."
        )
    for fmt in options.formats:
        try:
            backends[fmt].check()
        except (ModuleNotFoundError, RuntimeError) as err:
            raise type(err)(f"{where} with formats={list(options.formats)!r}: {err}") from err

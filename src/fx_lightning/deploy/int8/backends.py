"""The int8 backends: one per float format an int8 version can be made of, behind a name -> backend table.

A backend (:class:`Int8Backend`) says how the int8 version of its float format is made: it checks that it can run
here and makes an :class:`Int8Quantizer` for one float artifact. Each backend lives in its own module
(:mod:`.onnx`, :mod:`.pt2e`) and registers itself with :func:`register_int8_backend`; adding a backend is one module
and one registration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fx_lightning.registry import Registry


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
        make: ``make(base, fused, inputs, calibration, options) -> Int8Quantizer``: the quantizer of the float
            :class:`~fx_lightning.deploy.export.Artifact` ``base``, written from the ``fused`` network with the
            positional ``inputs``, calibrated on ``calibration`` (positional inputs in batches ``base`` runs), with
            the :class:`~fx_lightning.deploy.int8.options.Int8Options` ``options``.
        calibration_methods: the ``calibration_method`` values it honours.
    """

    format: str
    how: str
    check: Callable[[], None]
    make: Callable[..., Int8Quantizer]
    calibration_methods: tuple[str, ...] = ("minmax",)


BACKENDS: Registry[Int8Backend] = Registry("quantization backend", "register_int8_backend", "unregister_int8_backend")


def register_int8_backend(backend: Int8Backend) -> Int8Backend:
    """Add ``backend`` to the int8 versions :func:`~fx_lightning.deploy.int8.gate.quantize_artifacts` can make, under
    its float format's name.

    Raises:
        TypeError: if ``backend`` is not an :class:`Int8Backend`.
        ValueError: if a backend of that format is already registered.
    """
    if not isinstance(backend, Int8Backend):
        raise TypeError(
            f"register_int8_backend(backend=...) expects an fx_lightning.deploy.int8.backends.Int8Backend, got "
            f"{type(backend).__name__}. Build one with Int8Backend(format=..., how=..., check=..., make=...)."
        )
    return BACKENDS.register(backend.format, backend)


def unregister_int8_backend(name: str) -> Int8Backend:
    """Remove the int8 backend of the float format ``name`` and return it.

    Raises:
        KeyError: if no backend of that name is registered.
    """
    return BACKENDS.unregister(name)


def registered_int8_backends() -> dict[str, Int8Backend]:
    """The registered int8 backends, by float format, in registration order."""
    return BACKENDS.as_dict()

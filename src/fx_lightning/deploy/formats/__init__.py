"""The artifact formats, one exporter per format behind a name -> exporter table.

Each format lives in its own module (:mod:`.pt2`, :mod:`.onnx`, :mod:`.aoti`, :mod:`.openvino`, :mod:`.weights`) as an
:class:`Exporter`: how to write the network, how to load the file back in the runtime that will run it, and
what it needs installed. :func:`fx_lightning.deploy.export.export_artifacts` and
:func:`fx_lightning.deploy.check.verify_artifacts` read this table; adding a format means adding one module and one
:func:`register_exporter` call.
"""

from __future__ import annotations

from fx_lightning.deploy.formats.aoti import AOTI
from fx_lightning.deploy.formats.base import (
    Exporter,
    ExportJob,
    LoadContext,
    MissingCompilerError,
    MissingExtraError,
    Runner,
    check_options,
)
from fx_lightning.deploy.formats.onnx import ONNX
from fx_lightning.deploy.formats.openvino import OPENVINO
from fx_lightning.deploy.formats.pt2 import PT2
from fx_lightning.deploy.formats.weights import WEIGHTS
from fx_lightning.registry import Registry

FORMATS: Registry[Exporter] = Registry("format", "register_exporter", "unregister_exporter")


def register_exporter(exporter: Exporter) -> Exporter:
    """Add ``exporter`` to the formats :func:`~fx_lightning.deploy.export.export_artifacts` can write, under its name.

    Raises:
        TypeError: if ``exporter`` is not an :class:`Exporter`.
        ValueError: if a format of that name is already registered.
    """
    if not isinstance(exporter, Exporter):
        raise TypeError(
            f"register_exporter(exporter=...) expects an fx_lightning.deploy.formats.Exporter, got "
            f"{type(exporter).__name__}. Build one with Exporter(name=..., write=..., load=..., runtime=..., "
            "check=...)."
        )
    return FORMATS.register(exporter.name, exporter)


def unregister_exporter(name: str) -> Exporter:
    """Remove the format ``name`` and return its exporter.

    Raises:
        KeyError: if no format of that name is registered.
    """
    return FORMATS.unregister(name)


def registered_exporters() -> dict[str, Exporter]:
    """The registered formats, by name, in registration order (the order artifacts are written in)."""
    return FORMATS.as_dict()


register_exporter(PT2)
register_exporter(ONNX)
register_exporter(AOTI)
register_exporter(OPENVINO)
register_exporter(WEIGHTS)

__all__ = [
    "FORMATS",
    "ExportJob",
    "Exporter",
    "LoadContext",
    "MissingCompilerError",
    "MissingExtraError",
    "Runner",
    "check_options",
    "register_exporter",
    "registered_exporters",
    "unregister_exporter",
]

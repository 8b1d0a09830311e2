"""What every exporter shares: the :class:`Exporter` record, the job it writes from, and the errors it raises.

An exporter writes a network to one file and loads that file back in the runtime that will run it; the
registry in :mod:`fx_lightning.deploy.formats` maps each format name to its exporter. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

#: A loaded artifact, called like the network: ``runner(*inputs)``.
Runner = Callable[..., Any]


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of fx-lightning is not installed; the message names the pip extra to install."""


@dataclass
class ExportJob:
    """What the exporters write from: the network, one call's positional inputs, and the shapes to keep dynamic.

    Attributes:
        module: the network to write, in eval mode.
        inputs: positional inputs of one forward call.
        dynamic_shapes: ``torch.export`` dynamic shapes (a dynamic batch dimension), or ``None`` for fixed shapes.
    """

    module: nn.Module
    inputs: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...] | None = None
    _program: torch.export.ExportedProgram | None = None
    _capture_error: Exception | None = None
    #: what each format's writer wants reported with its artifact (format -> notes), e.g. an exporter fallback.
    notes: dict[str, list[str]] = field(default_factory=dict)

    def program(self, fmt: str) -> torch.export.ExportedProgram:
        """The ``torch.export`` program of the module, captured once and shared by every format that needs one.

        Raises:
            RuntimeError: if ``torch.export.export`` cannot capture the module.
        """
        if self._program is None:
            if self._capture_error is None:  # tried once: torch.export is slow to fail on a big network
                try:
                    self._program = torch.export.export(self.module, self.inputs, dynamic_shapes=self.dynamic_shapes)
                except Exception as err:  # noqa: BLE001 - kept, and raised for every format that needs the program
                    self._capture_error = err
            if self._capture_error is not None:
                err = self._capture_error
                raise RuntimeError(
                    f"export_artifacts(formats=[{fmt!r}]): torch.export.export could not capture "
                    f"{type(self.module).__name__}: {type(err).__name__}: {first_line(err)} (full error above). "
                    "Export the other formats with formats=['weights'], or make the forward exportable (no branches "
                    "on tensor values)."
                ) from err
        return self._program


@dataclass(frozen=True)
class LoadContext:
    """What a loader may need besides the file: the network it was written from and the format's options.

    Attributes:
        module: the network the artifact was written from (the weights format loads into a copy of it).
        options: this format's options, already checked by its exporter.
        output_spec: the pytree structure of the network's output, for runtimes that return flat lists.
    """

    module: nn.Module
    options: Mapping[str, Any] = field(default_factory=dict)
    output_spec: Any = None


@dataclass(frozen=True)
class Exporter:
    """One artifact format: how to write it, how to load it back in its runtime, what it needs installed.

    Attributes:
        name: the format name users pass, e.g. ``"onnx"``.
        write: ``write(job, stem, options) -> path``: writes ``job.module`` next to ``stem`` (directory / name, no
            suffix) and returns the file written.
        load: ``load(path, context) -> runner``: the artifact in the runtime that will run it.
        runtime: ``runtime(options) -> str``: a description of that runtime, e.g. ``"onnxruntime 1.20 CPU, ..."``.
        check: ``check(options) -> options``: raises before anything is written when the format cannot be written
            here (a missing extra or compiler, an unknown option) and returns the options completed with defaults.
        traced: whether the artifact is traced with the example's shapes, so that it runs other batch sizes only
            when written with ``dynamic_batch=True`` (a state dict is not: it runs any batch size).
    """

    name: str
    write: Callable[[ExportJob, Path, Mapping[str, Any]], Path]
    load: Callable[[Path, LoadContext], Runner]
    runtime: Callable[[Mapping[str, Any]], str]
    check: Callable[[Mapping[str, Any]], dict[str, Any]]
    traced: bool = True


def no_options(fmt: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A ``check`` for formats without options: any option given is an error."""

    def check(options: Mapping[str, Any]) -> dict[str, Any]:
        reject_unknown(fmt, options, ())
        return {}

    return check


def reject_unknown(fmt: str, options: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for an option ``fmt``'s exporter does not know."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = f"It accepts {list(known)}." if known else "It takes no options."
        raise ValueError(
            f"export options for {fmt!r} name unknown option(s) {unknown}. {accepted} "
            f"Pass e.g. options={{{fmt!r}: {{...}}}} with those keys only."
        )


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (the type's name when the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module without tensors)."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def to_device(args: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    """``args`` with every tensor moved to ``device`` (and made contiguous, as compiled runtimes expect)."""
    if all(isinstance(a, torch.Tensor) and a.device == device and a.is_contiguous() for a in args):
        return args  # the common case, without the cost of a tree walk on every call
    return tree_map(lambda t: t.to(device).contiguous() if isinstance(t, torch.Tensor) else t, args)

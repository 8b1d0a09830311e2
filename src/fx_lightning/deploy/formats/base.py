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
from torch.export import Dim
from torch.utils._pytree import TreeSpec, tree_map, tree_unflatten

from fx_lightning.errors import first_line
from fx_lightning.trees import module_device, tree_to

#: A loaded artifact, called like the network: ``runner(*inputs)``.
Runner = Callable[..., Any]


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of fx-lightning is not installed; the message names the pip extra to install."""


class MissingCompilerError(RuntimeError):
    """No working C++ compiler: AOTInductor cannot build its package."""


@dataclass
class ExportJob:
    """What the exporters write from: the network, one call's positional inputs, and the shapes to keep dynamic.

    Attributes:
        module: the network to write, in eval mode.
        inputs: positional inputs of one forward call.
        dynamic_shapes: ``torch.export`` dynamic shapes (a dynamic batch dimension), or ``None`` for fixed shapes.
        owner: the function the user called (``"write_artifacts"``, ``"export_artifacts"``, ...), which the
            exporters' errors name.
    """

    module: nn.Module
    inputs: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...] | None = None
    owner: str = "write_artifacts"
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
                    f"{self.owner}(formats=[{fmt!r}]): torch.export.export could not capture "
                    f"{type(self.module).__name__}: {type(err).__name__}: {first_line(err)} (full error above). "
                    "Export the other formats with formats=['weights'], or make the forward exportable (no branches "
                    "on tensor values)."
                ) from err
        return self._program

    def failed(self, fmt: str, doing: str, err: BaseException, instead: list[str]) -> RuntimeError:
        """The error a writer raises when ``fmt`` cannot be written: the call, what failed (``doing``), the upstream
        error's first line, and the formats to export ``instead``; raise it ``from err``."""
        return RuntimeError(
            f"{self.owner}(formats=[{fmt!r}]) could not {doing}: {type(err).__name__}: {first_line(err)} (full error "
            f"above). Export the other formats with formats={instead!r}."
        )


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


def check_options(exporter: Exporter, options: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """``exporter.check(options)``; what it needs and does not find here (an extra, a compiler) is named with the call
    that asked for it: ``write_artifacts(formats=['onnx']) needs onnx, ...``.

    Raises:
        MissingExtraError, MissingCompilerError: prefixed with ``owner(formats=[name])``.
    """
    try:
        return exporter.check(options)
    except (MissingExtraError, MissingCompilerError) as err:
        raise type(err)(f"{owner}(formats=[{exporter.name!r}]) {err}") from err


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


def structured(outputs: list[torch.Tensor], spec: TreeSpec | None) -> Any:
    """A runtime's flat outputs in the network's output structure (``spec``, recorded when it was written); the
    flat outputs as they came when the structure is unknown or does not match (a lone output unwrapped)."""
    if spec is not None and spec.num_leaves == len(outputs):
        return tree_unflatten(outputs, spec)
    return outputs[0] if len(outputs) == 1 else outputs


def on_device(run: Runner, module: nn.Module) -> Runner:
    """``run`` fed as the module it was written from is: every tensor on the module's device, contiguous (as compiled
    runtimes expect)."""
    device = module_device(module)
    return lambda *args: run(*tree_to(args, device=device, contiguous=True))


def batch_dim_shapes(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``torch.export`` dynamic shapes with a dynamic leading (batch) dimension on every tensor input that has one."""
    return tree_map(lambda t: {0: Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None, inputs)

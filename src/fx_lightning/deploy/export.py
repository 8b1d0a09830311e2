"""Deploy artifacts of a (fused) network, each reloaded and checked, and the checkpoint form of a fused network.

* :func:`write_artifacts` writes the network in each format of the registry (:mod:`fx_lightning.deploy.formats`):
  ``torch.export`` programs (``.pt2``), ONNX files, AOTInductor packages (``.aoti.pt2``), OpenVINO IR and plain
  weights;
  :func:`fx_lightning.deploy.check.verify_artifacts` then checks each file in its runtime with the task metric.
* :func:`export_artifacts` writes them, reloads each one and compares its outputs with the module's on the example
  inputs before returning the paths.
* :func:`checkpoint_state_dict` (from :mod:`..fusion.checkpoint_form`) expresses a fused network
  in the original architecture's state-dict keys, so a checkpoint keeps loading into the user's own class.

Nothing here imports Lightning; onnx/onnxruntime and inductor are imported only when their format is asked for.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from fx_lightning.deploy.formats import (
    Exporter,
    ExportJob,
    LoadContext,
    MissingCompilerError,
    MissingExtraError,
    Runner,
    check_options,
    registered_exporters,
)
from fx_lightning.deploy.formats.base import batch_dim_shapes
from fx_lightning.errors import first_line
from fx_lightning.fusion.checkpoint_form import checkpoint_state_dict
from fx_lightning.trees import batch_size, leading_sizes
from fx_lightning.verify.compare import compare_trees

#: The built-in formats, in the order they are written; :func:`fx_lightning.deploy.formats.registered_exporters` has
#: every registered one.
FORMATS = tuple(registered_exporters())

#: Per-format options: ``{"onnx": {"optimization_level": "basic"}, "aoti": {"inductor_configs": {...}}}``.
ExportOptions = Mapping[str, Mapping[str, Any]]

__all__ = [
    "FORMATS",
    "Artifact",
    "ExportOptions",
    "MissingCompilerError",
    "MissingExtraError",
    "checkpoint_state_dict",
    "export_artifacts",
    "write_artifacts",
]


@dataclass
class Artifact:
    """One written artifact: what it is, where it is, how it runs.

    Attributes:
        format: the format name (a key of :func:`fx_lightning.deploy.formats.registered_exporters`, or any name when
            ``runner`` is given).
        path: the file.
        runtime: what runs it, e.g. ``"onnxruntime 1.20.1 CPU, ORT_ENABLE_ALL"``.
        seconds: time spent writing it.
        options: the format's options, defaults included (the ONNX Runtime level it is run at, ...).
        batch_size: the only batch size a traced artifact with fixed shapes runs; ``None`` when any runs.
        runner: the artifact already loaded, for formats outside the registry (e.g. a checkpoint reloaded by
            the caller); ``None`` to load it with its exporter.
        loader: the registered format whose runtime loads it, when its own name is not one (an int8 ONNX file,
            ``"onnx-int8"``, is loaded as ``"onnx"``); ``None`` for ``format``.
        tolerance: its own verification tolerance (an int8 artifact's metric budget), instead of the one
            :func:`fx_lightning.deploy.check.verify_artifacts` is given; ``None`` for that one.
        base: the artifact of the same runtime it derives from (``"onnx"`` for ``"onnx-int8"``): its latency is also
            reported relative to that one's.
        details: facts about how it was made (the int8 calibration, the layers kept in float), reported with it.
        error: why it could not be made (then it is reported as failed, never loaded), or ``""``.
        notes: what the user should know about how it was made (e.g. the ONNX exporter it fell back to).
    """

    format: str
    path: Path
    runtime: str = ""
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    runner: Runner | None = None
    loader: str | None = None
    tolerance: float | None = None
    base: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    notes: list[str] = field(default_factory=list)

    def load(self, module: nn.Module, output_spec: Any = None) -> Runner:
        """The artifact in the runtime that will run it (``runner`` when given).

        Args:
            module: the network it was written from (the ``weights`` format loads into a copy of it).
            output_spec: the pytree structure of the network's output, for runtimes that return flat lists.

        Raises:
            ValueError: if the format is not registered and no ``runner`` was given.
        """
        if self.runner is not None:
            return self.runner
        exporter = registered_exporters().get(self.loader or self.format)
        if exporter is None:
            raise ValueError(
                f"Artifact(format={self.format!r}, loader={self.loader!r}) names no registered format "
                f"({list(registered_exporters())}); pass runner=... with the artifact loaded, or register its "
                "exporter with register_exporter()."
            )
        return exporter.load(self.path, LoadContext(module, self.options, output_spec))


# ----------------------------------------------------------------------------------------- writing


def write_artifacts(
    module: nn.Module,
    example_inputs: Sequence[Any],
    directory: str | Path,
    formats: Sequence[str] = ("pt2", "weights"),
    *,
    name: str = "model",
    dynamic_batch: bool = False,
    options: ExportOptions | None = None,
    keep_going: bool = False,
    owner: str = "write_artifacts",
) -> dict[str, Artifact]:
    """Write ``module`` in each format to ``directory``, without checking the files (see
    :func:`fx_lightning.deploy.check.verify_artifacts` for that, or :func:`export_artifacts`).

    Every argument is checked, and every format's needs (an extra, a C++ compiler) too, before anything is written.
    With ``keep_going=True`` a format that cannot be written (``torch.export`` cannot capture a whole detector, so
    neither ``pt2`` nor ``aoti`` can be made) does not stop the others: its :class:`Artifact` carries the upstream
    reason in ``error`` and is reported as failed.

    Args:
        module: the network to export, usually the eval-mode result of :func:`fx_lightning.fuse`.
        example_inputs: positional inputs for one forward call, e.g. ``(torch.randn(8, 3, 32, 32),)``.
        directory: where to write; created if missing.
        formats: any of the registered formats (``"pt2"``, ``"onnx"``, ``"aoti"``, ``"openvino"``, ``"weights"``).
        name: file name stem.
        dynamic_batch: export the traced formats with a dynamic dim 0 on every tensor input (needs example
            inputs with batch size >= 2).
        options: per-format options, e.g. ``{"onnx": {"optimization_level": "basic"}}``; see each module of
            :mod:`fx_lightning.deploy.formats`.
        keep_going: report a format that fails to export in its artifact's ``error`` instead of raising.
        owner: the function the user called, which error messages name (``"export_and_verify"`` when it writes
            through this one).

    Returns:
        The :class:`Artifact` of each format, in registry order.

    Raises:
        TypeError, ValueError: for an invalid argument, format or option.
        MissingExtraError: (a ``ModuleNotFoundError``) if a format's optional dependency is not installed.
        MissingCompilerError: (a ``RuntimeError``) if ``"aoti"`` is asked for and no C++ compiler works.
        RuntimeError: if an export fails (without ``keep_going``).
    """
    chosen = _validate_export(owner, module, example_inputs, formats, 0.0, 0.0, name, dynamic_batch)
    checked = _check_options(owner, chosen, options)
    job = _job(owner, module, example_inputs, dynamic_batch)
    out_dir = Path(directory).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for fmt, exporter in chosen.items():
        try:
            written[fmt] = _write(exporter, job, out_dir / name, checked[fmt])
        except Exception as err:
            if not keep_going:
                raise
            written[fmt] = Artifact(
                format=fmt,
                path=out_dir / f"{name}.{fmt}",
                runtime=exporter.runtime(checked[fmt]),
                options=checked[fmt],
                error=f"it could not be made: {type(err).__name__}: {first_line(err)}",
            )
    return written


def _job(owner: str, module: nn.Module, example_inputs: Sequence[Any], dynamic_batch: bool) -> ExportJob:
    inputs = tuple(example_inputs)
    return ExportJob(module, inputs, _batch_dynamic_shapes(owner, inputs) if dynamic_batch else None, owner)


def _write(exporter: Exporter, job: ExportJob, stem: Path, options: dict[str, Any]) -> Artifact:
    start = time.perf_counter()
    path = exporter.write(job, stem, options)
    fixed = exporter.traced and job.dynamic_shapes is None
    return Artifact(
        format=exporter.name,
        path=path,
        runtime=exporter.runtime(options),
        seconds=time.perf_counter() - start,
        options=options,
        batch_size=batch_size(job.inputs) if fixed else None,
        notes=list(job.notes.get(exporter.name, [])),
    )


def _check_options(owner: str, chosen: Mapping[str, Exporter], options: Any) -> dict[str, dict[str, Any]]:
    """Each chosen format's options, checked and completed by its exporter (which also checks its needs)."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
        raise TypeError(
            f"{owner}(options={options!r}) expects a dict of per-format option dicts, e.g. "
            "options={'onnx': {'optimization_level': 'basic'}}."
        )
    unknown = [f for f in options if f not in registered_exporters()]
    if unknown:
        raise ValueError(
            f"{owner}(options=...) has options for unknown format(s) {unknown}. "
            f"Valid formats: {list(registered_exporters())}."
        )
    return {fmt: check_options(exporter, options.get(fmt, {}), owner) for fmt, exporter in chosen.items()}


# ----------------------------------------------------------------------------------------- export_artifacts


def export_artifacts(
    module: nn.Module,
    example_inputs: Sequence[Any],
    directory: str | Path,
    formats: Sequence[str] = ("pt2", "weights"),
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    name: str = "model",
    dynamic_batch: bool = False,
    options: ExportOptions | None = None,
) -> dict[str, Path]:
    """Write ``module`` in each format to ``directory``, reload every file and check it against ``module``.

    Formats (the registry of :mod:`fx_lightning.deploy.formats`):

    * ``"pt2"``: ``torch.export.export`` + ``torch.export.save`` (``<name>.pt2``); reloaded with
      ``torch.export.load(path).module()``.
    * ``"onnx"``: ``torch.onnx.export`` (``<name>.onnx``); checked with ``onnx.checker`` and run with
      onnxruntime on the CPU. Needs ``pip install "fx-lightning[onnx]"``.
    * ``"aoti"``: an AOTInductor package (``<name>.aoti.pt2``) compiled with
      ``torch._inductor.aoti_compile_and_package``, reloaded with ``torch._inductor.aoti_load_package``. Needs a
      C++ compiler.
    * ``"openvino"``: OpenVINO IR (``<name>.xml`` + ``<name>.bin``) converted from the ``torch.export`` program, run
      by the OpenVINO CPU plugin. Needs ``pip install "fx-lightning[openvino]"``.
    * ``"weights"``: the state dict as ``<name>.safetensors`` when safetensors is installed, else
      ``<name>.pt`` (loadable with ``torch.load(path, weights_only=True)``); reloaded into a copy of the
      module's structure whose values were wiped first.

    Args:
        module: the network to export, usually the eval-mode result of :func:`fx_lightning.fuse`.
        example_inputs: positional inputs for one forward call, e.g. ``(torch.randn(1, 3, 32, 32),)``.
        directory: where to write; created if missing.
        formats: which artifacts to write, any of the registered formats.
        rtol: relative tolerance of the reload check (``|out - ref| <= atol + rtol * |ref|``).
        atol: absolute tolerance of the reload check.
        name: file name stem.
        dynamic_batch: export the traced formats with a dynamic dim 0 on every tensor input, and check the
            reloaded artifacts on a batch twice as large as well. Needs example inputs with batch size >= 2
            (``torch.export`` specialises size 1).
        options: per-format options, e.g. ``{"onnx": {"optimization_level": "basic"}}``.

    Returns:
        The path of each artifact by format.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if a format or option is unknown, a tolerance is negative or ``name`` is not a plain file name.
        MissingExtraError: (a ``ModuleNotFoundError``) if ``"onnx"`` or ``"openvino"`` is asked for without its extra.
        MissingCompilerError: (a ``RuntimeError``) if ``"aoti"`` is asked for and no C++ compiler works.
        RuntimeError: if an export fails, a reloaded artifact's outputs differ beyond the tolerance, or (with
            ``dynamic_batch``) an artifact does not accept another batch size.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Linear(4, 2)).eval()
        >>> paths = export_artifacts(net, (torch.randn(1, 4),), tempfile.mkdtemp(), formats=["weights"])
        >>> sorted(paths), paths["weights"].suffix in (".safetensors", ".pt")
        (['weights'], True)
    """
    chosen = _validate_export("export_artifacts", module, example_inputs, formats, rtol, atol, name, dynamic_batch)
    checked = _check_options("export_artifacts", chosen, options)
    job = _job("export_artifacts", module, example_inputs, dynamic_batch)
    inputs = job.inputs
    checks = [inputs, _doubled_batch(inputs)] if dynamic_batch else [inputs]
    with torch.no_grad():
        references = [module(*inputs)]
        if dynamic_batch:
            try:
                references.append(module(*checks[1]))
            except Exception as err:
                raise RuntimeError(
                    f"export_artifacts(dynamic_batch=True): {type(module).__name__} itself fails on a batch twice as "
                    f"large as the example: {type(err).__name__}: {first_line(err)}. Export with dynamic_batch=False."
                ) from err
    out_dir = Path(directory).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = tree_flatten(references[0])[1]

    paths: dict[str, Path] = {}
    for fmt, exporter in chosen.items():
        artifact = _write(exporter, job, out_dir / name, checked[fmt])
        path, run = artifact.path, artifact.load(module, spec)
        for args, reference in zip(checks, references):
            try:
                with torch.no_grad():
                    outputs = run(*args)
            except Exception as err:
                if args is inputs:
                    raise
                raise RuntimeError(
                    f"export_artifacts(dynamic_batch=True): the reloaded '{fmt}' artifact {path} does not accept a "
                    f"batch of another size: {type(err).__name__}: {first_line(err)}. The forward fixes the batch "
                    "size somewhere (e.g. a reshape to a constant); export with dynamic_batch=False."
                ) from err
            _check_close(fmt, path, tree_leaves(outputs), tree_leaves(reference), rtol, atol)
        paths[fmt] = path
    return paths


def _doubled_batch(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tree_map(lambda t: torch.cat([t, t]) if isinstance(t, Tensor) and t.dim() > 0 else t, inputs)


def _batch_dynamic_shapes(owner: str, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    batch_sizes = leading_sizes(inputs)
    if batch_sizes & {0, 1}:
        raise ValueError(
            f"{owner}(dynamic_batch=True) needs example inputs with batch size >= 2, got batch size(s) "
            f"{sorted(batch_sizes)}: torch.export treats sizes 0 and 1 as constants. Pass e.g. (x.repeat(2, 1, 1, 1),)."
        )
    return batch_dim_shapes(inputs)


def _validate_export(
    owner: str,
    module: Any,
    example_inputs: Any,
    formats: Any,
    rtol: Any,
    atol: Any,
    name: Any,
    dynamic_batch: Any,
) -> dict[str, Exporter]:
    """The chosen formats' exporters, in registry order, after checking every argument."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{owner}(module=...) expects a torch.nn.Module, got {type(module).__name__}. "
            f"Pass the network, e.g. {owner}(fuse(model.net), (x,), 'out')."
        )
    check_example_inputs(owner, example_inputs)
    exporters = registered_exporters()
    if isinstance(formats, str):
        formats = [formats]
    if not isinstance(formats, Sequence) or not all(isinstance(f, str) for f in formats):
        raise TypeError(
            f"{owner}(formats={formats!r}) expects a list of format names from {list(exporters)}, "
            "e.g. formats=['pt2', 'weights']."
        )
    unknown = [f for f in formats if f not in exporters]
    if unknown:
        raise ValueError(
            f"{owner}(formats={list(formats)!r}) names unknown format(s) {unknown}. Valid formats: {list(exporters)}."
        )
    for label, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value) or value < 0:
            raise ValueError(f"{owner}({label}={value!r}) expects a number >= 0, e.g. {label}=1e-5.")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(
            f"{owner}(name={name!r}) expects a plain file name stem such as 'model'; put folders in "
            "directory=... instead."
        )
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"{owner}(dynamic_batch={dynamic_batch!r}) expects True or False.")
    return {fmt: exporter for fmt, exporter in exporters.items() if fmt in formats}


def check_example_inputs(owner: str, example_inputs: Any) -> None:
    """Check that ``example_inputs`` is a sequence of positional inputs, not one tensor (``TypeError`` if not)."""
    if isinstance(example_inputs, (Tensor, str)) or not isinstance(example_inputs, Sequence):
        raise TypeError(
            f"{owner}(example_inputs=...) expects a tuple of positional inputs, got "
            f"{type(example_inputs).__name__}. Wrap a single tensor: example_inputs=(x,)."
        )


def _check_close(fmt: str, path: Path, outputs: list[Any], references: list[Any], rtol: float, atol: float) -> None:
    """Raise when a reloaded artifact's tensors differ from the module's beyond ``rtol`` relative to each output's
    scale (:func:`fx_lightning.verify.compare.compare_trees`); ``atol`` bounds the leaves whose reference is all zeros,
    which have no scale. Leaves whose shapes differ (post-processed detections) are not judged here: they are
    listed in a warning, and the task metric judges them (:func:`fx_lightning.deploy.check.verify_artifacts`)."""
    refs = [r for r in references if isinstance(r, Tensor)]
    outs = [o for o in outputs if isinstance(o, Tensor)]
    if len(outs) != len(refs):
        raise RuntimeError(
            f"export_artifacts: the reloaded '{fmt}' artifact {path} returned {len(outs)} tensor(s), the module "
            f"{len(refs)}. The format does not preserve this module's outputs; choose another format."
        )
    for out, ref in zip(outs, refs):
        # a post-processed output changes its count (dim 0) only; any other change of shape is not rounding
        if out.shape != ref.shape and (out.dim() != ref.dim() or out.shape[1:] != ref.shape[1:]):
            raise RuntimeError(
                f"export_artifacts: the reloaded '{fmt}' artifact {path} returned shape {tuple(out.shape)}, the "
                f"module {tuple(ref.shape)}."
            )
    comparison = compare_trees(refs, outs, rtol=rtol, atol=atol)
    if not comparison.compared_passed:
        raise RuntimeError(
            f"export_artifacts: the reloaded '{fmt}' artifact {path} differs from the module: max abs error "
            f"{comparison.max_abs:.3e}, max rel error {comparison.max_rel:.3e}, tolerance rtol={rtol:g}, atol={atol:g} "
            "(rtol relative to each output's largest value, atol for outputs that are all zeros). Check that the "
            "module is deterministic and in eval mode, or loosen rtol/atol."
        )
    if comparison.varying:
        warnings.warn(
            f"export_artifacts: the reloaded '{fmt}' artifact {path} returned {len(comparison.varying)} output(s) of "
            "another shape than the module's (post-processed outputs such as detections after NMS); they were not "
            "compared. Check the artifact with the task metric: "
            "fx_lightning.deploy.flow.verify_artifacts(..., metric=...).",
            stacklevel=3,
        )

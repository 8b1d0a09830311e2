"""Write and check deploy artifacts in one call: :func:`export_and_verify`.

It writes the artifacts (:func:`fx_lightning.deploy.export.write_artifacts`), makes the int8 versions asked for
(:func:`fx_lightning.deploy.int8.gate.quantize_artifacts`), and checks them all where they run, with the task metric
(:func:`fx_lightning.deploy.check.verify_artifacts`). The layers below it do not import it: the checking core
(:mod:`~fx_lightning.deploy.check`, :mod:`~fx_lightning.deploy.report`) sits below int8, and this module above both.
The names of the checking core stay importable from here, where earlier releases had them.

Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fx_lightning.deploy.check import ArtifactMismatchWarning, check_in_runtimes, failed_path, verify_artifacts
from fx_lightning.deploy.export import Artifact, ExportOptions, write_artifacts
from fx_lightning.deploy.int8.gate import SUFFIX, quantize_artifacts, unmade
from fx_lightning.deploy.int8.options import Int8Options, int8_options
from fx_lightning.deploy.report import ArtifactReport, DeployReport
from fx_lightning.deploy.table import deploy_table

__all__ = [
    "ArtifactMismatchWarning",
    "ArtifactReport",
    "DeployReport",
    "check_in_runtimes",
    "deploy_table",
    "export_and_verify",
    "failed_path",
    "verify_artifacts",
]


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
    """:func:`~fx_lightning.deploy.export.write_artifacts` then :func:`~fx_lightning.deploy.check.verify_artifacts`:
    write, check, time, report.

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
            (:class:`~fx_lightning.deploy.int8.options.Int8Options` or a dict of its fields, e.g.
            ``{"formats": ["onnx"], "max_metric_drop": 0.01}``); each one's float format is written too.
            ``None``: no int8.
        calibration: the batches int8 calibrates on (the training data); required with ``int8``.
        artifacts: artifacts the caller made itself, checked and timed with the written ones, after them (an
            :class:`~fx_lightning.deploy.export.Artifact` with ``runner=``, e.g. a checkpoint it reloaded).
        keep_going: an int8 version that cannot be made (its calibration data cannot be read, its quantizer
            fails) fails only the int8 artifacts, with the reason as their ``error``, instead of raising.
        **verify_kwargs: :func:`~fx_lightning.deploy.check.verify_artifacts`'s keyword arguments (``metric``,
            ``tolerance``, ``strict``, ...).

    Returns:
        The :class:`DeployReport`.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from fx_lightning import fuse
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3)).eval()
        >>> data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
        >>> x = data[0][0]
        >>> report = export_and_verify(net, fuse(net, (x,)), (x,), tempfile.mkdtemp(), data, latency_budget_s=0.05)
        >>> sorted(report.announced()), report.artifacts["weights"].verification.num_samples
        (['pt2', 'weights'], 24)
    """
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
        owner="export_and_verify",
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
                owner="export_and_verify",
            )
        except Exception as err:
            if not keep_going:
                raise
            error = f"int8 could not be made: {type(err).__name__}: {err}"
            written |= {f + SUFFIX: unmade(f, written.get(f), error) for f in int8_wanted.formats}
    written |= dict(artifacts or {})
    return verify_artifacts(
        written, original, fused, batches, example_inputs, owner="export_and_verify", **verify_kwargs
    )

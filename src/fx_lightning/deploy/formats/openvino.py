"""``openvino``: OpenVINO IR (``.xml`` + ``.bin``) converted from the ``torch.export`` program, run by the OpenVINO
CPU plugin. Needs ``pip install "fx-lightning[openvino]"``.

The weights are saved in float32 (``save_model(..., compress_to_fp16=False)``), so the file holds what the fused
network computes; the plugin may still choose a lower inference precision on CPUs that support one, which the
verification then measures.

Options:

* ``threads``: the plugin's ``INFERENCE_NUM_THREADS``; default the current ``torch.get_num_threads()``.
* ``inference_precision``: the plugin's ``INFERENCE_PRECISION_HINT`` (e.g. ``"f32"``, ``"bf16"``); default the
  plugin's own choice, as users deploy it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fx_lightning.deploy.formats.base import (
    Exporter,
    ExportJob,
    LoadContext,
    MissingExtraError,
    Runner,
    reject_unknown,
    structured,
)
from fx_lightning.trees import tensor_leaves


def import_openvino() -> Any:
    """The ``openvino`` module, or a :class:`MissingExtraError` naming the extra that installs it."""
    try:
        import openvino
    except ImportError as err:
        raise MissingExtraError(
            f'needs openvino ({err}). Install it with: pip install "fx-lightning[openvino]"'
        ) from err
    return openvino


def check_openvino(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with defaults, after checking that openvino is installed.

    Raises:
        MissingExtraError: without the ``openvino`` extra.
        ValueError: for an unknown option or a thread count below 1.
    """
    reject_unknown("openvino", options, ("threads", "inference_precision"))
    import_openvino()
    threads = options.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(
            f"export options {{'openvino': {{'threads': {threads!r}}}}} expects a positive integer, or None for "
            "torch.get_num_threads()."
        )
    precision = options.get("inference_precision")
    if precision is not None and not isinstance(precision, str):
        raise ValueError(
            f"export options {{'openvino': {{'inference_precision': {precision!r}}}}} expects a precision name such "
            "as 'f32' or 'bf16', or None for the plugin's choice."
        )
    return {"threads": threads, "inference_precision": precision}


def write_openvino(job: ExportJob, stem: Path, options: Mapping[str, Any]) -> Path:
    """Convert the job's program to OpenVINO IR and save ``<stem>.xml`` (and its ``.bin``) in float32."""
    ov = import_openvino()
    path = stem.with_name(stem.name + ".xml")
    try:
        model = ov.convert_model(job.program("openvino"))
        ov.save_model(model, str(path), compress_to_fp16=False)
    except Exception as err:
        raise job.failed("openvino", f"convert {type(job.module).__name__}", err, ["pt2", "onnx", "weights"]) from err
    return path


def load_openvino(path: Path, context: LoadContext) -> Runner:
    """The IR compiled by the CPU plugin; outputs as tensors in the network's structure."""
    ov = import_openvino()
    options = check_openvino(context.options)
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": options["threads"] or torch.get_num_threads()}
    if options["inference_precision"] is not None:
        config["INFERENCE_PRECISION_HINT"] = options["inference_precision"]
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    spec = context.output_spec

    def run(*args: Any) -> Any:
        arrays = [t.detach().cpu().contiguous().numpy() for t in tensor_leaves(args)]
        results = compiled(arrays)
        outputs = [torch.from_numpy(results[out].copy()) for out in compiled.outputs]
        return structured(outputs, spec)

    return run


def openvino_runtime(options: Mapping[str, Any]) -> str:
    ov = import_openvino()
    precision = options.get("inference_precision") or "plugin default precision"
    return f"OpenVINO {ov.__version__.split('-')[0]} CPU, {precision}"


OPENVINO = Exporter(
    name="openvino", write=write_openvino, load=load_openvino, runtime=openvino_runtime, check=check_openvino
)

"""``onnx``: ``torch.onnx.export`` of the ``torch.export`` program, run by ONNX Runtime on the CPU.

When ``torch.export`` cannot capture the network (whole torchvision detectors: data-dependent guards in
``batched_nms`` and box decoding), the file is written by the TorchScript-based exporter instead
(``torch.onnx.export(..., dynamo=False, opset_version=17)``, as torchvision documents for its detectors), and the
artifact's notes say so; its input is then the same number of images as the example's.

Options:

* ``optimization_level``: the ONNX Runtime graph optimisation level the artifact is verified (and timed) at,
  as users deploy it: ``"disable_all"``, ``"basic"``, ``"extended"``, ``"all"`` (ORT's default), an
  ``onnxruntime.GraphOptimizationLevel`` or its name (``"ORT_ENABLE_BASIC"``).
* ``threads``: ONNX Runtime's intra-op threads; default the current ``torch.get_num_threads()``, so that latency
  compares like with like.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from fx_lightning.deploy.formats.base import (
    Exporter,
    ExportJob,
    LoadContext,
    MissingExtraError,
    Runner,
    reject_unknown,
    structured,
)
from fx_lightning.errors import first_line
from fx_lightning.trees import tensor_leaves

_INLINE_LIMIT = 1 << 30  # bytes of parameters above which ONNX weights go to an external data file
#: Short names of ``onnxruntime.GraphOptimizationLevel`` members.
LEVELS = {
    "disable_all": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_DEFAULT_LEVEL = "ORT_ENABLE_ALL"  # what onnxruntime.SessionOptions() starts with


def import_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a :class:`MissingExtraError` naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise MissingExtraError(
            f'needs onnx, onnxruntime and onnxscript ({err}). Install them with: pip install "fx-lightning[onnx]"'
        ) from err
    return onnx, onnxruntime


def check_onnx(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with defaults (``optimization_level`` as an ``ORT_*`` name, ``threads``), after checking that
    onnx and onnxruntime are installed.

    Raises:
        MissingExtraError: without the ``onnx`` extra.
        ValueError: for an unknown option or optimisation level, or a thread count below 1.
    """
    reject_unknown("onnx", options, ("optimization_level", "threads"))
    import_onnx()
    level = options.get("optimization_level")
    name = _DEFAULT_LEVEL if level is None else getattr(level, "name", level)
    if isinstance(name, str):
        name = LEVELS.get(name.lower(), name.upper())
    if name not in LEVELS.values():
        raise ValueError(
            f"export options {{'onnx': {{'optimization_level': {level!r}}}}} is not an ONNX Runtime optimisation "
            f"level. Pass one of {list(LEVELS)} (or onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC, ...)."
        )
    threads = options.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(
            f"export options {{'onnx': {{'threads': {threads!r}}}}} expects a positive integer, or None for "
            "torch.get_num_threads()."
        )
    return {"optimization_level": name, "threads": threads}


#: The opset of the TorchScript-based fallback (torchvision's detectors need 11 or later).
FALLBACK_OPSET = 17


def write_onnx(job: ExportJob, stem: Path, options: Mapping[str, Any]) -> Path:
    """Export the job's program to ``<stem>.onnx`` with the dynamo exporter and check it with ``onnx.checker``; when
    ``torch.export`` cannot capture the network, export it with the TorchScript-based exporter and note why."""
    onnx, _ = import_onnx()
    path = stem.with_name(stem.name + ".onnx")
    param_bytes = sum(p.numel() * p.element_size() for p in job.module.parameters())
    try:
        program = job.program("onnx")
    except RuntimeError as capture_error:
        upstream = capture_error.__cause__ or capture_error
        _write_torchscript_onnx(job, path, onnx)
        job.notes.setdefault("onnx", []).append(
            f"torch.export could not capture {type(job.module).__name__} ({type(upstream).__name__}: "
            f"{first_line(upstream)[:300]}): written by the TorchScript-based exporter instead "
            f"(torch.onnx.export(dynamo=False, opset_version={FALLBACK_OPSET}))"
        )
        return path
    try:
        torch.onnx.export(
            program,
            job.inputs,
            str(path),
            dynamo=True,
            external_data=param_bytes > _INLINE_LIMIT,
            verbose=False,
        )
        onnx.checker.check_model(str(path))
    except Exception as err:
        raise job.failed("onnx", f"export {type(job.module).__name__}", err, ["pt2", "weights"]) from err
    return path


def _write_torchscript_onnx(job: ExportJob, path: Path, onnx: Any) -> None:
    """The TorchScript-based exporter (tracing): what torchvision documents for its whole detectors."""
    names = [f"input_{i}" for i, t in enumerate(tree_leaves(job.inputs)) if isinstance(t, Tensor)]
    dynamic_axes = {name: {0: "batch"} for name in names} if job.dynamic_shapes is not None else None
    try:
        with warnings.catch_warnings():
            # the tracer's warnings on Python values (sizes, NMS thresholds) recorded as constants: expected here
            warnings.simplefilter("ignore")
            torch.onnx.export(
                job.module,
                job.inputs,
                str(path),
                dynamo=False,
                opset_version=FALLBACK_OPSET,
                input_names=names,
                dynamic_axes=dynamic_axes,
            )
        onnx.checker.check_model(str(path))
    except Exception as err:
        doing = (
            f"export {type(job.module).__name__}: torch.export cannot capture it, and the TorchScript-based exporter"
        )
        raise job.failed("onnx", doing + " failed too", err, ["weights"]) from err


def load_onnx(path: Path, context: LoadContext) -> Runner:
    """An ONNX Runtime CPU session at the options' optimisation level; outputs in the network's structure."""
    _, ort = import_onnx()
    options = check_onnx(context.options)
    settings = ort.SessionOptions()
    settings.graph_optimization_level = getattr(ort.GraphOptimizationLevel, options["optimization_level"])
    settings.intra_op_num_threads = options["threads"] or torch.get_num_threads()
    # Idle ORT threads otherwise spin for a while after each run, taking the cores from whatever runs next
    # (the PyTorch networks it is timed beside, the rest of the user's process).
    settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=settings, providers=["CPUExecutionProvider"])
    names = [arg.name for arg in session.get_inputs()]
    spec = context.output_spec

    def run(*args: Any) -> Any:
        tensors = tensor_leaves(args)
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(names, tensors)}
        outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
        return structured(outputs, spec)

    return run


def onnx_runtime(options: Mapping[str, Any]) -> str:
    _, ort = import_onnx()
    level = check_onnx(options)["optimization_level"]
    return f"onnxruntime {ort.__version__} CPU, {level}"


ONNX = Exporter(name="onnx", write=write_onnx, load=load_onnx, runtime=onnx_runtime, check=check_onnx)

"""``onnx-int8``: ONNX Runtime static post-training quantization (QDQ) of the float ``onnx`` artifact.

The float file is pre-processed (``quant_pre_process``: shape inference and graph clean-up), calibrated once on
the calibration inputs (activation ranges, MinMax by default), then quantized with per-channel int8 weights and
uint8 activations, the layout ONNX Runtime's x86 kernels run fastest (``QuantType.QUInt8`` / ``QInt8``). On an
x86 CPU without VNNI the weights use 7 bits (``reduce_range``), as ONNX Runtime advises: the AVX2 kernels add
pairs of 8-bit products in 16 bits, which full-range weights can saturate. Quantizing again with some layers
kept in float reuses the calibration. The result is run by the same ONNX Runtime session as the float file
(:mod:`.onnx`).

Nothing here runs a PyTorch network: calibration feeds ONNX Runtime, so the network, its BatchNorm statistics and
the random state are never touched.
"""

from __future__ import annotations

import inspect
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fx_lightning.deploy.export import Artifact
from fx_lightning.deploy.formats.base import MissingExtraError
from fx_lightning.deploy.formats.onnx import import_onnx
from fx_lightning.deploy.int8.backends import Int8Backend, register_int8_backend
from fx_lightning.deploy.int8.options import Int8Options
from fx_lightning.errors import first_line
from fx_lightning.trees import tensor_leaves

#: ONNX operators whose weights are quantized (and whose names a float fallback lists).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Calibration methods by the names users give.
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "distribution": "Distribution"}


def import_quantization() -> Any:
    """``onnxruntime.quantization``, or a :class:`MissingExtraError` naming the extra that installs it."""
    try:
        import_onnx()
        from onnxruntime import quantization
    except ImportError as err:
        cause = err.__cause__ or err
        raise MissingExtraError(
            f"int8 'onnx' needs onnx and onnxruntime (with onnxruntime.quantization): {cause}. Install them with: "
            'pip install "fx-lightning[onnx]"'
        ) from err
    return quantization


@dataclass
class OnnxQuantizer:
    """Quantizes one float ONNX file, calibrated once on the given inputs.

    Args:
        source: the float ``.onnx`` file.
        calibration: positional inputs of the calibration calls (CPU tensors in the example's dtype, in batches
            the file runs).
        method: the calibration method, a key of :data:`METHODS`.
        reduce_range: 7-bit weights; ``None`` chooses them on an x86 CPU without VNNI (:func:`cpu_has_vnni`).
    """

    source: Path
    calibration: Sequence[tuple[Any, ...]]
    method: str = "minmax"
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        quantization = import_quantization()
        self._work = Path(tempfile.mkdtemp(prefix="fx_lightning_int8_"))
        try:
            self._prepare(quantization)
        except BaseException:
            self.close()
            raise

    def _prepare(self, quantization: Any) -> None:
        self._prepared = self._work / "float.onnx"
        self.notes: list[str] = []
        try:
            quantization.shape_inference.quant_pre_process(str(self.source), str(self._prepared))
        except Exception as err:  # noqa: BLE001 - pre-processing is an optimisation; quantize the file as written
            shutil.copyfile(self.source, self._prepared)
            self.notes.append(
                f"quant_pre_process failed ({type(err).__name__}: {first_line(err)}); quantized as written"
            )
        onnx, ort = import_onnx()
        model = onnx.load(str(self._prepared), load_external_data=False)
        nodes = [node for node in model.graph.node if node.op_type in LAYER_OPS]
        #: The quantizable layers (ONNX node names), in graph order.
        self.layers = [node.name for node in nodes]
        self._modules = {node.name: _module_path(node) for node in nodes}
        session = ort.InferenceSession(str(self._prepared), providers=["CPUExecutionProvider"])
        self._names = [arg.name for arg in session.get_inputs()]
        self._feeds = list(_feeds(self.calibration, self._names))
        if not self._feeds:
            raise ValueError("int8 calibration got no inputs: give at least one calibration batch")
        self._cache = self._work / "calibration.json"
        self._cached = "calibration_cache_path" in inspect.signature(quantization.quantize_static).parameters
        self._float_outputs: list[list[np.ndarray]] | None = None
        #: Seconds spent calibrating (the first quantization's activation-range pass).
        self.calibration_s = 0.0
        if self.reduce_range is None:
            self.reduce_range = _is_x86() and not cpu_has_vnni()

    @property
    def num_samples(self) -> int:
        """Calibration samples seen (rows of the first input over all calibration calls)."""
        return sum(next(iter(feed.values())).shape[0] for feed in self._feeds)

    def facts(self) -> dict[str, Any]:
        """How it quantizes: the calibration method and whether weights use 7 bits."""
        return {"calibration_method": self.method, "reduce_range": self.reduce_range}

    def label(self, layer: str) -> str:
        """The layer as users know it: the network's module path the exporter recorded (``layer1.0.conv1``),
        with the ONNX node name (``layer1.0.conv1 (node_conv2d_1)``); the node name alone when none was recorded."""
        module = self._modules.get(layer)
        return f"{module} ({layer})" if module else layer

    def write(self, path: Path, float_layers: Sequence[str] = ()) -> Path:
        """Quantize every layer but ``float_layers`` into ``path``; the first call calibrates."""
        start = time.perf_counter()
        self._quantize(path, exclude=list(float_layers))
        if not self.calibration_s:
            self.calibration_s = time.perf_counter() - start
        return path

    def sensitivity(self) -> list[tuple[str, float]]:
        """Each layer's error alone: the file with only that layer quantized, run on the calibration inputs, its
        outputs' squared error relative to the float file's. Most sensitive first."""
        _, ort = import_onnx()
        if self._float_outputs is None:
            self._float_outputs = self._run(ort, self._prepared)
        reference = self._float_outputs
        energy = sum(float(np.square(o.astype(np.float64)).sum()) for outs in reference for o in outs) or 1.0
        errors = []
        probe = self._work / "one_layer.onnx"
        for layer in self.layers:
            self._quantize(probe, only=[layer])
            outputs = self._run(ort, probe)
            squared = sum(
                float(np.square(q.astype(np.float64) - f.astype(np.float64)).sum())
                for qs, fs in zip(outputs, reference)
                for q, f in zip(qs, fs)
            )
            errors.append((layer, squared / energy))
        return sorted(errors, key=lambda item: -item[1] if item[1] == item[1] else -math.inf)  # NaN: most sensitive

    def close(self) -> None:
        """Remove the working files."""
        shutil.rmtree(self._work, ignore_errors=True)

    def _quantize(self, path: Path, *, exclude: list[str] | None = None, only: list[str] | None = None) -> None:
        q = import_quantization()
        kwargs: dict[str, Any] = {}
        if self._cached:
            kwargs["calibration_cache_path"] = str(self._cache)
        q.quantize_static(
            str(self._prepared),
            str(path),
            _Reader(self._feeds),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=None,
            per_channel=True,
            reduce_range=bool(self.reduce_range),
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_quantize=only,
            nodes_to_exclude=exclude or None,
            calibrate_method=getattr(q.CalibrationMethod, METHODS[self.method]),
            **kwargs,
        )

    def _run(self, ort: Any, path: Path) -> list[list[np.ndarray]]:
        settings = ort.SessionOptions()
        settings.intra_op_num_threads = torch.get_num_threads()
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), sess_options=settings, providers=["CPUExecutionProvider"])
        return [session.run(None, feed) for feed in self._feeds]


class _Reader:
    """Calibration feeds as ONNX Runtime reads them: ``get_next()`` until ``None`` (the interface of
    ``onnxruntime.quantization.CalibrationDataReader``, which the calibrators call without an ``isinstance`` check)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._iter = iter(feeds)
        self._size = len(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._iter


def _module_path(node: Any) -> str:
    """The module path ``torch.onnx`` (dynamo) recorded for a node in ``pkg.torch.onnx.name_scopes``, or ``""``."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    return ""


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI), read from ``/proc/cpuinfo``
    (``False`` where it cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _feeds(calibration: Sequence[tuple[Any, ...]], names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """ONNX Runtime feeds of the calibration inputs (already in batches the file runs)."""
    for args in calibration:
        tensors = [t.detach().cpu().contiguous() for t in tensor_leaves(args)]
        if any(t.dtype == torch.bfloat16 for t in tensors):
            raise TypeError(
                "int8 'onnx' calibrates through NumPy, which has no bfloat16: export the network in float32 "
                "(e.g. a float32 copy of a bf16-true model) to quantize it"
            )
        yield {name: t.numpy() for name, t in zip(names, tensors)}


def _check() -> None:
    import_quantization()


def _make(
    base: Artifact, fused: nn.Module, inputs: tuple[Any, ...], calibration: list[tuple[Any, ...]], options: Int8Options
) -> OnnxQuantizer:
    return OnnxQuantizer(base.path, calibration, options.calibration_method)


#: ``onnx-int8``: how the int8 version of an ``onnx`` artifact is made.
ONNX_INT8 = register_int8_backend(Int8Backend("onnx", "int8 QDQ", _check, _make, calibration_methods=tuple(METHODS)))

"""int8 artifacts: the options, the accuracy gate, and one backend per runtime, each registered by its own module.

* :mod:`.options`: :class:`Int8Options` and :func:`int8_options` (every field checked before anything runs);
* :mod:`.gate`: :func:`quantize_artifacts`, calibration and the accuracy gate;
* :mod:`.backends`: the int8 backend registry (:func:`register_int8_backend`), one backend per float format:
  :mod:`.onnx` (ONNX Runtime static QDQ quantization), :mod:`.pt2e` (torchao's PT2E flow, AOTInductor).
"""

from fx_lightning.deploy.int8 import onnx, pt2e  # each registers its backend
from fx_lightning.deploy.int8.backends import (
    BACKENDS,
    Int8Backend,
    Int8Quantizer,
    register_int8_backend,
    registered_int8_backends,
    unregister_int8_backend,
)
from fx_lightning.deploy.int8.gate import SUFFIX, conform_batches, int8_path, quantize_artifacts, unmade
from fx_lightning.deploy.int8.options import Int8Options, int8_options

__all__ = [
    "BACKENDS",
    "SUFFIX",
    "Int8Backend",
    "Int8Options",
    "Int8Quantizer",
    "conform_batches",
    "int8_options",
    "int8_path",
    "onnx",
    "pt2e",
    "quantize_artifacts",
    "register_int8_backend",
    "registered_int8_backends",
    "unmade",
    "unregister_int8_backend",
]

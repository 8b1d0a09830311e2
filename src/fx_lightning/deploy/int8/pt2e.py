"""``aoti-int8``: torchao's PT2E static quantization (x86 Inductor quantizer) of the fused network, compiled by
AOTInductor and run by ``aoti_load_package`` like the float ``aoti`` package.

The network is captured with ``torch.export.export(strict=True)`` (the quantizer groups nodes by their source
function, which only the strict tracer records; a ReLU module called twice, as in ResNet blocks, otherwise makes a
partition with two outputs), observers are inserted by ``prepare_pt2e`` with
``get_default_x86_inductor_quantization_config()`` (per-channel int8 weights, static uint8 activations), the copy
is calibrated on the calibration inputs, converted, exported again and compiled with ``freezing=True``, so that
Inductor lowers each dequantize-conv-quantize pattern to a oneDNN int8 kernel. Layers are kept in float by module
name (``set_module_name_qconfig(name, None)``).

The network itself is never run in training mode nor changed: ``torch.export`` works on its parameters without
writing them, and calibration runs the exported copy. Importing torchao's quantizer installs an Inductor pre-grad
pass globally (``torch._inductor.config.pre_grad_custom_pass``); it is put back as found, and set only while an
int8 package compiles.

Needs ``pip install "fx-lightning[torchao]"`` (torchao 0.18 was checked with torch 2.14) and a C++ compiler.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fx_lightning.deploy.export import Artifact
from fx_lightning.deploy.formats.aoti import DEFAULT_INDUCTOR_CONFIGS, find_compiler
from fx_lightning.deploy.formats.base import MissingExtraError, batch_dim_shapes
from fx_lightning.deploy.int8.backends import Int8Backend, register_int8_backend
from fx_lightning.deploy.int8.options import Int8Options
from fx_lightning.trees import leading_size, module_device, tensor_leaves

#: Layers the x86 Inductor quantizer makes int8 (and a float fallback can name).
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def import_torchao() -> tuple[Any, Any, Any]:
    """``(prepare_pt2e, convert_pt2e, x86_inductor_quantizer)`` with Inductor's global pre-grad pass put back as
    found, or a :class:`MissingExtraError` naming the extra that installs torchao."""
    from torch._inductor import config as inductor_config

    before = inductor_config.pre_grad_custom_pass
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as err:
        raise MissingExtraError(
            f"int8 'aoti' needs torchao's PT2E quantization ({err}). Install it with: "
            'pip install "fx-lightning[torchao]"'
        ) from err
    else:
        _LIFT_UP.setdefault("pass", inductor_config.pre_grad_custom_pass)
    finally:
        inductor_config.pre_grad_custom_pass = before
    return prepare_pt2e, convert_pt2e, x86_inductor_quantizer


_LIFT_UP: dict[str, Any] = {}  # the pre-grad pass torchao's quantizer installs, set only while int8 compiles


@dataclass
class Pt2eQuantizer:
    """Quantizes the fused network with torchao's PT2E flow and compiles it with AOTInductor.

    Args:
        module: the fused network (eval mode).
        inputs: the positional inputs the float artifacts were written with.
        calibration: positional inputs of the calibration calls.
        dynamic_batch: compile with a dynamic batch dimension (as the float package was).
        inductor_configs: the float ``aoti`` package's Inductor settings.
    """

    module: nn.Module
    inputs: tuple[Any, ...]
    calibration: Sequence[tuple[Any, ...]]
    dynamic_batch: bool = False
    inductor_configs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        import_torchao()
        find_compiler()
        device = module_device(self.module)
        if device.type != "cpu":
            raise ValueError(
                f"int8 'aoti' builds an x86 CPU package with torchao's x86 Inductor quantizer, but the network is on "
                f"{device}. Make int8 versions of the 'onnx' format instead, or export from a CPU copy of the network."
            )
        self.notes: list[str] = []
        #: The quantizable layers (module names), in module order.
        self.layers = [name for name, m in self.module.named_modules() if isinstance(m, LAYER_TYPES)]
        self._captured: torch.fx.GraphModule | None = None
        self._float_outputs: list[list[Tensor]] | None = None
        self.calibration_s = 0.0

    @property
    def num_samples(self) -> int:
        """Calibration samples seen (rows of the first input over all calibration calls)."""
        return sum(1 if (rows := leading_size(args)) is None else rows for args in self.calibration)

    def facts(self) -> dict[str, Any]:
        """How it quantizes: the x86 Inductor quantizer's default static configuration, min/max observers."""
        return {
            "quantizer": "X86InductorQuantizer, per-channel int8 weights, static uint8 activations",
            "calibration_method": "minmax",
        }

    def label(self, layer: str) -> str:
        """The layer as users know it: its module path."""
        return layer

    def write(self, path: Path, float_layers: Sequence[str] = ()) -> Path:
        """Quantize every layer but ``float_layers``, calibrate, convert and compile into ``path``."""
        start = time.perf_counter()
        converted = self._converted(exclude=float_layers)
        if not self.calibration_s:
            self.calibration_s = time.perf_counter() - start
        from torch._inductor import aoti_compile_and_package
        from torch._inductor import config as inductor_config

        configs = {**DEFAULT_INDUCTOR_CONFIGS, **(self.inductor_configs or {})}
        program = torch.export.export(converted, self.inputs, dynamic_shapes=self._dynamic_shapes())
        with inductor_config.patch(pre_grad_custom_pass=_LIFT_UP.get("pass")):
            aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
        return path

    def sensitivity(self) -> list[tuple[str, float]]:
        """Each layer's error alone: the network with only that layer quantized (run eagerly, as converted) on the
        calibration inputs, its outputs' squared error relative to the float network's. Most sensitive first."""
        if self._float_outputs is None:
            with torch.no_grad():
                self._float_outputs = [tensor_leaves(self._capture()(*args)) for args in self.calibration]
        reference = self._float_outputs
        energy = sum(float(o.double().square().sum()) for outs in reference for o in outs) or 1.0
        errors = []
        for layer in self.layers:
            converted = self._converted(only=layer)
            with torch.no_grad():
                squared = sum(
                    float((q.double() - f.double()).square().sum())
                    for args, fs in zip(self.calibration, reference)
                    for q, f in zip(tensor_leaves(converted(*args)), fs)
                )
            errors.append((layer, squared / energy))
        return sorted(errors, key=lambda item: -item[1] if item[1] == item[1] else -math.inf)  # NaN: most sensitive

    def close(self) -> None:
        """Nothing to remove: the package is written where asked, the rest stays in memory."""

    def _capture(self) -> torch.fx.GraphModule:
        if self._captured is None:
            program = torch.export.export(self.module, self.inputs, dynamic_shapes=self._dynamic_shapes(), strict=True)
            self._captured = program.module()
        return self._captured

    def _converted(self, *, exclude: Sequence[str] = (), only: str | None = None) -> nn.Module:
        prepare_pt2e, convert_pt2e, x86 = import_torchao()
        quantizer = x86.X86InductorQuantizer()
        config = x86.get_default_x86_inductor_quantization_config()
        if only is None:
            quantizer.set_global(config)
            for name in exclude:
                quantizer.set_module_name_qconfig(name, None)
        else:
            quantizer.set_module_name_qconfig(only, config)
        prepared = prepare_pt2e(copy.deepcopy(self._capture()), quantizer)
        with torch.no_grad():
            for args in self.calibration:
                prepared(*args)
        return convert_pt2e(prepared)

    def _dynamic_shapes(self) -> tuple[Any, ...] | None:
        return batch_dim_shapes(self.inputs) if self.dynamic_batch else None


def _check() -> None:
    import_torchao()
    find_compiler()


def _make(
    base: Artifact, fused: nn.Module, inputs: tuple[Any, ...], calibration: list[tuple[Any, ...]], options: Int8Options
) -> Pt2eQuantizer:
    return Pt2eQuantizer(
        fused,
        inputs,
        calibration,
        dynamic_batch=base.batch_size is None,
        inductor_configs=dict(base.options.get("inductor_configs") or {}),
    )


#: ``aoti-int8``: how the int8 version of an ``aoti`` package is made.
AOTI_INT8 = register_int8_backend(Int8Backend("aoti", "int8 PT2E x86 Inductor", _check, _make))

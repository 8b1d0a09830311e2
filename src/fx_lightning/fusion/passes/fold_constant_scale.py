"""Fold a constant multiply, divide, add or subtract after a convolution or linear layer into its weights.

``conv(x) * gamma`` with a per-channel ``gamma`` (layer scale), ``linear(x) / 2`` or ``conv(x) - c`` are,
at inference, the same layer with scaled weights and a shifted bias. The constant is a Python number or a
parameter/buffer of the model (optionally reshaped or indexed), which is fixed in the fused model.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.parameter import is_lazy

from fx_lightning.fusion.maths import all_finite, constant_affine, fold_affine_after_layer
from fx_lightning.fusion.passes.matching import (
    IN_PLACE_ARITHMETIC,
    arithmetic_operands,
    get_attr_tensor,
    has_hooks,
    producer_layer,
    tensor_rank,
)
from fx_lightning.fusion.passes.rewriting import (
    PassChanges,
    Rewrite,
    install_for_node,
    replace_with_input,
    scope_of,
    with_new_params,
)
from fx_lightning.fusion.report import Merged

RULE = "fold_constant_scale"

# Pure reshaping of a stored constant, e.g. ``self.gamma.view(1, -1, 1, 1)`` or ``self.gamma[:, None, None]``.
_CONSTANT_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "contiguous"}
_CONSTANT_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten}


def fold_constant_scale(gm: fx.GraphModule) -> PassChanges:
    """Fold every ``layer(x) <op> constant`` into the layer when the layer's output has no other reader.

    ``<op>`` is ``*``, ``/`` (layer output first, constant without zeros), ``+`` or ``-`` (either order, with
    ``torch.add``/``torch.sub``'s ``alpha``). The layer is a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or
    ``Linear`` with torch's own forward. The constant must be a number or a tensor of the layer's dtype
    that broadcasts over the output without changing its shape, one value per output channel or one in all.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        :class:`PassChanges` with one :class:`Rewrite` (one :class:`Merged` record) per folded operation.
    """
    result = PassChanges()
    for node in list(gm.graph.nodes):
        match = _match(gm, node)
        if match is None:
            continue
        layer_node, layer, scale, shift, label = match
        if isinstance(layer, nn.Linear):
            layout = "linear"
        elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
            layout = "conv_transpose"
        else:
            layout = "conv"
        weight, bias = fold_affine_after_layer(
            layer.weight, layer.bias, scale, shift, layout=layout, groups=getattr(layer, "groups", 1)
        )
        if not all_finite(weight, bias):
            continue  # the folded weights overflow the layer's dtype
        rewrite = Rewrite(RULE, [], scope=scope_of([node, layer_node]))
        target = install_for_node(gm, layer_node, with_new_params(layer, weight, bias))
        if "tensor_meta" in node.meta:
            layer_node.meta["tensor_meta"] = node.meta["tensor_meta"]
        replace_with_input(node, layer_node)
        rewrite.records.append(Merged(target, (label,), RULE))
        result.rewrites.append(rewrite)
    return result


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module, Tensor, Tensor, str] | None:
    """``(layer node, layer, scale, shift, label)`` when ``node`` is an affine constant op on a layer output."""
    operands = arithmetic_operands(node)
    if operands is None:
        return None
    op, first, second, alpha = operands
    for layer_first, layer_node, other in ((True, first, second), (False, second, first)):
        if not isinstance(layer_node, fx.Node) or (node.target in IN_PLACE_ARITHMETIC and not layer_first):
            continue
        layer = producer_layer(gm, layer_node)
        if layer is None or list(layer_node.users) != [node] or other is layer_node:
            continue
        if is_lazy(layer.weight) or has_hooks(layer):
            continue
        constant, label = _constant(gm, other)
        if constant is None:
            continue
        per_channel = _per_channel(gm, layer_node, layer, constant)
        if per_channel is None:
            continue
        affine = constant_affine(op, per_channel, layer_first=layer_first, alpha=alpha)
        if affine is None:
            continue
        scale, shift = affine
        return layer_node, layer, _channels(scale, layer), _channels(shift, layer), f"{op}({label})"
    return None


def _channels(values: Tensor, layer: nn.Module) -> Tensor:
    """Broadcast a scalar or per-channel float64 tensor to one value per output channel."""
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return values.reshape(-1).expand(channels) if values.numel() == 1 else values.reshape(-1)


def _constant(gm: fx.GraphModule, value: Any, depth: int = 0) -> tuple[Tensor | float | None, str]:
    """Evaluate ``value`` if it is a finite number or a stored tensor, possibly reshaped; else ``(None, "")``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value), repr(value)) if math.isfinite(value) else (None, "")
    if not isinstance(value, fx.Node) or depth > 8:
        return None, ""
    if value.op == "get_attr":
        tensor, _ = get_attr_tensor(gm, value)
        if not isinstance(tensor, Tensor) or is_lazy(tensor) or not all_finite(tensor):
            return None, ""
        return tensor.detach(), str(value.target)
    if not value.args or not all(_is_static(a) for a in (*value.args[1:], *value.kwargs.values())):
        return None, ""
    pure = (value.op == "call_method" and value.target in _CONSTANT_METHODS) or (
        value.op == "call_function" and value.target in _CONSTANT_FUNCTIONS
    )
    if not pure:
        return None, ""
    source, label = _constant(gm, value.args[0], depth + 1)
    if not isinstance(source, Tensor):
        return None, ""
    with torch.no_grad():
        if value.op == "call_method":
            out = getattr(source, value.target)(*value.args[1:], **value.kwargs)
        else:
            out = value.target(source, *value.args[1:], **value.kwargs)
    return (out, label) if isinstance(out, Tensor) else (None, "")


def _is_static(value: Any) -> bool:
    """Whether an argument is plain data (ints, slices, None, ...), not a graph value."""
    if isinstance(value, (tuple, list)):
        return all(_is_static(v) for v in value)
    if isinstance(value, slice):
        return all(_is_static(v) for v in (value.start, value.stop, value.step))
    return value is None or value is Ellipsis or isinstance(value, (int, bool))


def _per_channel(gm: fx.GraphModule, layer_node: fx.Node, layer: nn.Module, constant: Tensor | float) -> Any:
    """The constant as one value per output channel (a tensor) or one in all (a number), or ``None``.

    ``None`` when broadcasting it would change the output's shape or dtype, or it varies along other dims.
    """
    if not isinstance(constant, Tensor):
        return constant
    weight = layer.weight
    if constant.is_complex() or constant.dtype == torch.bool:
        return None
    if constant.dim() > 0 and (constant.dtype != weight.dtype or constant.device != weight.device):
        return None  # a dimensioned tensor of another dtype would promote the output's dtype
    if constant.dim() == 0:
        return float(constant)
    if isinstance(layer, nn.Linear):
        channels, channel_dim, safe_rank = layer.out_features, -1, 1
    else:
        channels = layer.out_channels
        channel_dim = -(weight.dim() - 1)
        safe_rank = weight.dim() - 1  # a conv output has at least channel + spatial dims, batched or not
    rank = tensor_rank(gm, layer_node)
    if constant.dim() > (rank if rank is not None else safe_rank):
        return None
    for dim in range(1, constant.dim() + 1):
        size = constant.shape[-dim]
        if size != 1 and not (-dim == channel_dim and size == channels):
            return None
    if constant.numel() == 1:
        return float(constant.reshape(()))
    return constant.reshape(-1)

"""Fold a BatchNorm into the convolution, transposed convolution or linear layer that produces its input.

The layer is a module (``nn.Conv2d`` and friends, with torch's own forward) or a functional call
(``F.conv2d``, ``F.conv_transpose2d``, ``F.linear``, ...) on stored parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.parameter import is_lazy

from fx_lightning.fusion.maths import BatchNormStats, fold_bn_after_conv, fold_bn_after_linear
from fx_lightning.fusion.passes.matching import (
    BatchNormCall,
    bind_args,
    describe,
    foldable_batch_norms,
    has_hooks,
    is_transposed,
    producer_layer,
    tensor_rank,
    tensor_shape,
    users_text,
    value_users,
)
from fx_lightning.fusion.passes.rewriting import (
    PASS_THROUGH,
    PassChanges,
    Rewrite,
    install_for_node,
    replace_with_input,
    scope_of,
    with_new_params,
)
from fx_lightning.fusion.report import Folded

RULE = "fold_bn_into_preceding"

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
# Functional layers: their positional argument names and their kind.
_FUNCTIONAL: dict[Callable[..., Any], tuple[tuple[str, ...], str]] = {
    **{fn: (_CONV_ARGS, "conv") for fn in (F.conv1d, F.conv2d, F.conv3d)},
    **{fn: (_CONV_T_ARGS, "conv_transpose") for fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
    F.linear: (("input", "weight", "bias"), "linear"),
}


@dataclass
class Layer:
    """The layer a BatchNorm follows, whichever form calls it.

    Attributes:
        name: module path, or for a functional call the node name (used in messages and the report).
        kind: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
        weight: the stored weight.
        bias: the stored bias, or ``None``.
        groups: convolution groups (1 for linear).
        hooked: whether forward hooks could observe the layer's output.
        module: the module, for the module form.
        weight_node: the ``get_attr`` node of the weight, for the functional form.
        node: the node calling the layer.
        rows: a ``flatten(y, 0, 1)`` between a Linear and the BatchNorm (LeViT), or the last of a chain of views,
            or ``None``.
        rows_proven: whether shapes from example inputs showed the chain puts the Linear's features in the
            BatchNorm's dim 1 (see :func:`_viewed_linear`).
    """

    name: str
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    hooked: bool = False
    module: nn.Module | None = None
    weight_node: fx.Node | None = None
    node: fx.Node | None = None
    rows: fx.Node | None = None
    rows_proven: bool = False

    @property
    def out_features(self) -> int:
        if self.kind == "conv_transpose":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]


def fold_bn_into_preceding(gm: fx.GraphModule) -> PassChanges:
    """Fold every inference BatchNorm whose input is the sole output of a conv/conv-transpose/linear call.

    The folded layer gets new weight and bias tensors; a layer called at several sites gets a new
    sibling module for the folded site, so the other sites keep computing what they did. A functional
    call gets new parameters beside its old ones, which stay for any other reader.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        :class:`PassChanges` with one :class:`Rewrite` per fold and a reason for every BatchNorm left.
    """
    result = PassChanges()
    for bn in foldable_batch_norms(gm, result.reasons):
        if _concatenation(bn.input) is not None:
            parts, why = _concatenated_parts(gm, bn)
        else:
            layer, why = _layer(gm, bn.input)
            why = why or _why_not(gm, bn, layer)
            parts = [] if why or layer is None or bn.stats is None else [(layer, bn.stats)]
        if why:
            result.reasons[bn.node.name] = why
            continue
        assert bn.input is not None
        touched = [bn.node, bn.input, *(layer.node for layer, _ in parts if layer.node is not None)]
        rewrite = Rewrite(RULE, [], scope=scope_of(touched))
        targets = [_fold_part(gm, layer, stats) for layer, stats in parts]
        rewrite.swaps = _swaps(gm, bn, parts, targets)
        rewrite.seen = {layer.name: layer.module for layer, _ in parts if layer.module is not None}
        replace_with_input(bn.node, bn.input)
        rewrite.records.append(Folded(bn.name, ", ".join(targets), RULE, layers=tuple(targets)))
        result.rewrites.append(rewrite)
    return result


def _swaps(
    gm: fx.GraphModule, bn: BatchNormCall, parts: list[tuple[Layer, BatchNormStats]], targets: list[str]
) -> dict[str, nn.Module | None] | None:
    """The fold as module replacements (each layer at its own path, the BatchNorm a pass-through), or ``None``.

    ``None`` when a layer is a functional call or was renamed (another reader keeps the old one), or when the
    BatchNorm's input reached it around a call that is a no-op only in eval (Dropout): the user's Dropout stays in
    the module tree, and a train-mode Dropout between the layer and an identity would not be exact.
    """
    if any(layer.module is None or layer.name != target for (layer, _), target in zip(parts, targets)):
        return None
    if bn.input in bn.node.meta.get("bypassed", ()):
        return None
    swaps: dict[str, nn.Module | None] = {layer.name: gm.get_submodule(layer.name) for layer, _ in parts}
    if bn.module is not None:
        swaps[str(bn.node.target)] = PASS_THROUGH
    else:
        # A functional BatchNorm: the module whose own forward calls it becomes a pass-through of its input
        # there (checked by the pipeline on that module's own trace).
        owner = scope_of([bn.node])
        if not owner:
            return None
        swaps[owner] = PASS_THROUGH
    return swaps


def _fold_part(gm: fx.GraphModule, layer: Layer, stats: BatchNormStats) -> str:
    """Give ``layer``'s call new parameters with ``stats`` folded in; returns what the call now uses."""
    if layer.kind == "linear":
        folded = fold_bn_after_linear(layer.weight, layer.bias, stats)
    else:
        transposed = layer.kind == "conv_transpose"
        folded = fold_bn_after_conv(layer.weight, layer.bias, stats, transposed=transposed, groups=layer.groups)
    assert layer.node is not None
    if layer.module is not None:
        return install_for_node(gm, layer.node, with_new_params(layer.module, *folded))
    return _point_call_at(gm, layer, folded)


_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)


def _concatenation(node: fx.Node | None) -> list[Any] | None:
    """The concatenated values when ``node`` is ``torch.cat(values, dim=1)``, else ``None``."""
    if node is None or node.op != "call_function" or node.target not in _CONCATENATIONS:
        return None
    args = bind_args(node, ("tensors", "dim"), {"dim": 0})
    values = args.get("tensors")
    return list(values) if args["dim"] == 1 and isinstance(values, (list, tuple)) else None


def _concatenated_parts(gm: fx.GraphModule, bn: BatchNormCall) -> tuple[list[tuple[Layer, BatchNormStats]], str]:
    """Split ``bn`` over the convolutions whose outputs ``torch.cat(..., dim=1)`` joins (MixNet's MixedConv2d)."""
    cat = bn.input
    assert cat is not None
    assert bn.stats is not None
    values = _concatenation(cat) or []
    where = f"its input is a concatenation ('{cat.name}')"
    if len(value_users(cat)) > 1:
        return [], f"{where} also read by {users_text(cat, besides=bn.node)}"
    if len(set(values)) != len(values) or not all(isinstance(v, fx.Node) for v in values):
        return [], f"{where} of repeated or non-tensor parts"
    parts: list[tuple[Layer, BatchNormStats]] = []
    start = 0
    for value in values:
        layer, _ = _layer(gm, value)
        if layer is None or layer.kind == "linear" or layer.rows is not None:
            return [], f"{where} whose part '{value.name}' is not a Conv/ConvTranspose layer call"
        why = _layer_problem(gm, layer, value, reader=cat, rank=bn.rank or tensor_rank(gm, cat))
        if why:
            return [], f"{where}: {why}"
        end = start + layer.out_features
        parts.append((layer, _channels(bn.stats, start, end)))
        start = end
    if start != bn.num_features:
        return [], f"{where} of {start} channels, but it normalises {bn.num_features}"
    return parts, ""


def _channels(stats: BatchNormStats, start: int, end: int) -> BatchNormStats:
    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[start:end]

    return BatchNormStats(stats.running_mean[start:end], stats.running_var[start:end], stats.eps,
                          part(stats.weight), part(stats.bias))  # fmt: skip


def _layer(gm: fx.GraphModule, node: fx.Node | None) -> tuple[Layer | None, str]:
    """The layer ``node`` calls, or ``(None, reason)`` when it is a layer call that cannot be folded into."""
    viewed = _viewed_linear(gm, node)
    if viewed is not None:
        layer, _ = _layer(gm, viewed)
        if layer is not None and layer.kind == "linear":
            layer.rows, layer.rows_proven = node, True
            return layer, ""
    inner = _flattened_rows(node)
    if inner is not None:
        layer, why = _layer(gm, inner)
        if layer is None or layer.kind != "linear":
            return None, why
        layer.rows = node
        return layer, ""
    module = producer_layer(gm, node, padded=True)
    if module is not None:
        assert node is not None
        kind = "conv_transpose" if is_transposed(module) else "conv"
        kind = "linear" if isinstance(module, nn.Linear) else kind
        groups = getattr(module, "groups", 1)
        hooked = has_hooks(module)
        return Layer(str(node.target), kind, module.weight, module.bias, groups, hooked, module=module, node=node), ""
    if node is None or node.op != "call_function" or node.target not in _FUNCTIONAL:
        return None, ""
    names, kind = _FUNCTIONAL[node.target]
    args = bind_args(node, names, {"bias": None, "groups": 1})
    weight_node, bias_node = args.get("weight"), args["bias"]
    stored = [a for a in (weight_node, bias_node) if a is not None]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in stored):
        computed = next(a for a in stored if not (isinstance(a, fx.Node) and a.op == "get_attr"))
        what = computed.format_node() if isinstance(computed, fx.Node) else repr(computed)
        return None, f"the weight or bias of '{node.name}' is computed in the graph ({what}), not a stored tensor"
    if not isinstance(args["groups"], int):
        return None, f"'{node.name}' has non-constant groups ({args['groups']})"
    weight = _attribute(gm, weight_node)
    bias = _attribute(gm, bias_node) if bias_node is not None else None
    return Layer(node.name, kind, weight, bias, args["groups"], weight_node=weight_node, node=node), ""


_VIEW_METHODS = frozenset({"reshape", "view", "flatten", "reshape_as", "view_as", "contiguous", "permute", "transpose"})
_VIEW_FUNCTIONS = {torch.reshape: "reshape", torch.flatten: "flatten", torch.permute: "permute",
                   torch.transpose: "transpose"}  # fmt: skip


def _view_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node] | None:
    """``(kind, input)`` when ``node`` only rearranges its input's elements (a view op), else ``None``."""
    if node.op == "call_method" and node.target in _VIEW_METHODS and node.args:
        kind = str(node.target)
    elif node.op == "call_function" and node.target in _VIEW_FUNCTIONS and node.args:
        kind = _VIEW_FUNCTIONS[node.target]
    elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Flatten) and node.args:
        kind = "flatten"
    else:
        return None
    source = node.args[0]
    return (kind, source) if isinstance(source, fx.Node) else None


def _viewed_linear(gm: fx.GraphModule, node: fx.Node | None) -> fx.Node | None:
    """The Linear call ``y`` when ``node`` is ``y`` rearranged by views alone (reshape, view, flatten, reshape_as,
    permute, transpose), each read by nothing but the next, and the shapes propagated from example inputs show
    that the Linear's features land in dim 1 of ``node``, where BatchNorm normalises. Else ``None``.

    The features axis is followed through each view: a reshape keeps it only as the last dim of the same size
    with the same number of rows before it; a permute or transpose moves it.
    """
    chain: list[tuple[str, fx.Node]] = []
    current = node
    while current is not None and (view := _view_of(gm, current)) is not None:
        chain.append((view[0], current))
        current = view[1]
    if not chain or current is None or current.op not in ("call_module", "call_function"):
        return None
    top = current
    shapes = [tensor_shape(gm, top), *(tensor_shape(gm, n) for _, n in reversed(chain))]
    if any(s is None or not s for s in shapes):
        return None
    features = shapes[0][-1]
    axis = len(shapes[0]) - 1
    previous = top
    for (kind, view), before, after in zip(reversed(chain), shapes, shapes[1:]):
        if value_users(previous) != [view]:
            return None
        if kind in ("permute", "transpose"):
            order = _permutation(view, kind, len(before))
            if order is None:
                return None
            axis = order.index(axis)
        elif kind != "contiguous":
            rows_before, rows_after = math.prod(before[:-1]), math.prod(after[:-1])
            if axis != len(before) - 1 or after[-1] != features or rows_before != rows_after:
                return None
            axis = len(after) - 1
        previous = view
    final = shapes[-1]
    return top if axis == 1 and len(final) in (2, 3) and final[1] == features else None


def _permutation(node: fx.Node, kind: str, rank: int) -> list[int] | None:
    """The source dim of each output dim of a ``permute``/``transpose`` call with constant dims, else ``None``."""
    args = list(node.args[1:])
    if node.kwargs:
        return None
    if kind == "transpose":
        if len(args) != 2 or not all(isinstance(a, int) for a in args):
            return None
        first, second = (a % rank for a in args)
        order = list(range(rank))
        order[first], order[second] = order[second], order[first]
        return order
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    if len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    order = [d % rank for d in dims]
    return order if sorted(order) == list(range(rank)) else None


def _flattened_rows(node: fx.Node | None) -> fx.Node | None:
    """``y`` when ``node`` is ``y.flatten(0, 1)`` or ``torch.flatten(y, 0, 1)``, else ``None``."""
    if node is None or not (
        (node.op == "call_method" and node.target == "flatten")
        or (node.op == "call_function" and node.target is torch.flatten)
    ):
        return None
    args = bind_args(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    inner = args["input"]
    return inner if isinstance(inner, fx.Node) and args["start_dim"] == 0 and args["end_dim"] == 1 else None


def _attribute(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    owner, _, name = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _why_not(gm: fx.GraphModule, bn: BatchNormCall, layer: Layer | None) -> str:
    source = bn.input
    if layer is None or source is None:
        what = describe(source) if source is not None else "a non-tensor argument"
        return f"its input is not a Conv/ConvTranspose/Linear layer call ({what})"
    why = _layer_problem(gm, layer, source, reader=bn.node, rank=bn.rank or tensor_rank(gm, source))
    if why:
        return why
    if bn.num_features != layer.out_features:
        return f"it normalises {bn.num_features} features but '{layer.name}' produces {layer.out_features}"
    rank = bn.rank or tensor_rank(gm, source)
    if layer.rows is not None and layer.rows_proven:
        return ""
    if layer.rows is not None:
        assert layer.node is not None
        if len(value_users(layer.node)) > 1:
            return f"the output of '{layer.name}' is also read by {users_text(layer.node, besides=layer.rows)}"
        inner = tensor_rank(gm, layer.node)
        if inner != 3:
            shown = "unknown" if inner is None else f"{inner}-D"
            return (
                f"'{layer.name}' output rank is {shown}: flatten(0, 1) puts the Linear's features in BatchNorm's "
                "dim 1 only for 3-D output (pass example_inputs to fuse() if it is 3-D)"
            )
    elif layer.kind == "linear" and rank != 2:
        shown = "unknown" if rank is None else f"{rank}-D"
        return (
            f"'{layer.name}' output rank is {shown}: BatchNorm normalises dim 1, which is the Linear's "
            "features only for 2-D input (pass example_inputs to fuse() if it is 2-D)"
        )
    return ""


def _layer_problem(gm: fx.GraphModule, layer: Layer, source: fx.Node, reader: fx.Node, rank: int | None) -> str:
    """Why ``layer``'s output ``source``, read by ``reader``, cannot absorb a per-channel affine map, or ``""``."""
    if is_lazy(layer.weight):
        return f"the preceding layer '{layer.name}' is lazy and not materialised yet"
    if len(value_users(source)) > 1:
        return f"the output of '{layer.name}' is also read by {users_text(source, besides=reader)}"
    if layer.hooked:
        return f"the preceding layer '{layer.name}' has forward hooks, which would see folded outputs"
    if layer.kind != "linear" and rank != layer.weight.dim():
        if rank is None:
            return (
                f"the rank of '{layer.name}' output is unknown: on unbatched input BatchNorm's dim 1 would not be its "
                "channels (pass example_inputs to fuse() to settle it)"
            )
        return f"'{layer.name}' runs on unbatched input ({rank}-D output), where BatchNorm dim 1 is not channels"
    return ""


def _point_call_at(gm: fx.GraphModule, layer: Layer, folded: tuple[torch.Tensor, torch.Tensor]) -> str:
    """Point a functional layer call at new ``folded`` parameters stored beside its weight; returns their path."""
    call, weight_node = layer.node, layer.weight_node
    assert call is not None
    assert weight_node is not None
    owner_path, _, attr = str(weight_node.target).rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    suffix = 1
    while hasattr(owner, f"{attr}_folded{suffix}") or hasattr(owner, f"{attr}_folded{suffix}_bias"):
        suffix += 1
    requires_grad = bool(layer.weight.requires_grad)
    nodes = []
    for name, tensor in ((f"{attr}_folded{suffix}", folded[0]), (f"{attr}_folded{suffix}_bias", folded[1])):
        owner.register_parameter(name, nn.Parameter(tensor, requires_grad=requires_grad))
        with gm.graph.inserting_before(call):
            nodes.append(gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name))
    args, kwargs = list(call.args), dict(call.kwargs)
    for index, key, value in ((1, "weight", nodes[0]), (2, "bias", nodes[1])):
        if len(args) > index:
            args[index] = value
        else:
            kwargs[key] = value
    old = [a for a in call.all_input_nodes if a.op == "get_attr" and a not in nodes]
    call.args, call.kwargs = tuple(args), kwargs
    for node in old:
        _drop_if_unread(gm, node)
    return str(nodes[0].target)


def _drop_if_unread(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a ``get_attr`` node nothing reads any more, and its tensor when no other node fetches it.

    The tensor stays while any node of the graph names its owner module, whose own code may read it.
    """
    if node.users:
        return
    target = str(node.target)
    gm.graph.erase_node(node)
    owner_path, _, attr = target.rpartition(".")
    for other in gm.graph.nodes:
        if other.op == "get_attr" and other.target == target:
            return
        if other.op == "call_module" and owner_path and str(other.target) in (owner_path, *_parents(owner_path)):
            return
    delattr(gm.get_submodule(owner_path) if owner_path else gm, attr)


def _parents(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]

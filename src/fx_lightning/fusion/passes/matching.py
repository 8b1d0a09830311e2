"""Pattern matching over fx graphs: BatchNorm calls, layer calls, arithmetic, tensor ranks, readers and writers.

Everything here only reads the graph; :mod:`fx_lightning.fusion.passes.rewriting` changes it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from fx_lightning.fusion.maths import BatchNormStats
from fx_lightning.fusion.padded_conv import padded_conv_family
from fx_lightning.fusion.shapes import ensure as ensure_shapes
from fx_lightning.fusion.tracing import has_forward_hooks, is_batch_norm_module

# ----------------------------------------------------------------------------------------------- BatchNorm calls

# Positional layouts of the two functional BatchNorm entry points, as (name of each argument) in order.
_FUNCTIONAL_BN: dict[Callable[..., Any], tuple[str, ...]] = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
}
_FUNCTIONAL_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


@dataclass
class BatchNormCall:
    """A BatchNorm call found in a graph, in module or functional form.

    ``stats`` is ``None`` when the call cannot be folded exactly; ``reason`` then says why. ``rank`` is the input
    rank the BatchNorm itself guarantees (``BatchNorm2d`` raises on anything but 4-D), ``None`` when it accepts
    several.
    """

    node: fx.Node
    input: fx.Node | None
    name: str
    num_features: int
    stats: BatchNormStats | None
    reason: str = ""
    module: nn.Module | None = None
    rank: int | None = None


def bind_args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Map a call node's positional and keyword arguments onto ``names``, filling ``defaults``."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def get_attr_tensor(gm: fx.GraphModule, value: Any) -> tuple[torch.Tensor | None, str]:
    """Resolve a ``get_attr`` node (or ``None``) to its tensor; returns ``(tensor, "")`` or ``(None, reason)``."""
    if value is None:
        return None, ""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        owner_path, _, attr = value.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        return getattr(owner, attr), ""
    what = value.format_node() if isinstance(value, fx.Node) else repr(value)
    return None, f"its statistics are computed in the graph ({what}), not stored parameters or buffers"


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks that could observe or change what folding moves."""
    return has_forward_hooks(module)


def match_batch_norm(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
    """Recognise ``node`` as an inference BatchNorm call, or return ``None`` when it is not a BatchNorm at all."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not is_batch_norm_module(module):
            return None
        return _match_module_bn(node, module)
    if node.op == "call_function" and node.target in _FUNCTIONAL_BN:
        return _match_functional_bn(gm, node)
    return None


def foldable_batch_norms(gm: fx.GraphModule, reasons: dict[str, str]) -> Iterator[BatchNormCall]:
    """Yield every BatchNorm call in ``gm`` whose statistics allow a fold; record in ``reasons`` why others do not.

    The node list is taken up front, so a caller may erase the yielded node.
    """
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        bn = match_batch_norm(gm, node)
        if bn is None:
            continue
        if bn.stats is None:
            reasons[node.name] = bn.reason
            continue
        yield bn


def _match_module_bn(node: fx.Node, bn: nn.Module) -> BatchNormCall:
    mean, var = bn.running_mean, bn.running_var
    num_features = getattr(bn, "num_features", mean.numel() if mean is not None and not is_lazy(mean) else -1)
    call = BatchNormCall(node, _first_node(node), str(node.target), num_features, None, module=bn)
    call.rank = _checked_rank(bn)
    if mean is None or var is None:
        call.reason = "no running statistics: it normalises with batch statistics even in eval"
    elif is_lazy(mean) or (bn.weight is not None and is_lazy(bn.weight)):
        call.reason = "lazy BatchNorm not materialised yet; run one forward pass before fusing"
    elif has_hooks(bn):
        call.reason = "it has forward hooks, which would see different tensors after folding"
    elif len(node.args) != 1 or node.kwargs:
        call.reason = f"called with extra arguments ({node.format_node()})"
    else:
        affine = getattr(bn, "affine", True)
        weight = bn.weight if affine else None
        bias = bn.bias if affine else None
        call.stats = BatchNormStats(mean, var, float(bn.eps), weight, bias)
    return call


def _checked_rank(bn: nn.Module) -> int | None:
    """The one input rank ``bn``'s own ``_check_input_dim`` accepts, or ``None`` (several, or no check)."""
    check = getattr(bn, "_check_input_dim", None)
    if check is None:
        return None
    accepted = []
    for rank in range(1, 7):
        try:
            check(torch.empty((1,) * rank, device="meta"))
        except Exception:  # noqa: BLE001, S112 - any refusal means "not this rank"
            continue
        accepted.append(rank)
    return accepted[0] if len(accepted) == 1 else None


def _match_functional_bn(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall:
    args = bind_args(node, _FUNCTIONAL_BN[node.target], _FUNCTIONAL_DEFAULTS)
    tensors: dict[str, torch.Tensor | None] = {}
    reason = ""
    for key in ("running_mean", "running_var", "weight", "bias"):
        tensors[key], why = get_attr_tensor(gm, args.get(key))
        reason = reason or why
    owners = [a.target.rpartition(".")[0] for a in node.all_input_nodes if a.op == "get_attr"]
    name = owners[0] if owners else node.name
    mean, var = tensors["running_mean"], tensors["running_var"]
    num_features = mean.numel() if mean is not None and not is_lazy(mean) else -1
    call = BatchNormCall(node, _first_node(node), name, num_features, None)
    if args["training"] is not False:
        call.reason = "it runs with training=True (no running statistics), so it uses batch statistics"
    elif mean is None or var is None:
        call.reason = reason or "no running statistics: it normalises with batch statistics even in eval"
    elif reason:
        call.reason = reason
    elif not isinstance(args["eps"], (int, float)):
        call.reason = f"eps is not a constant ({args['eps']})"
    else:
        call.stats = BatchNormStats(mean, var, float(args["eps"]), tensors["weight"], tensors["bias"])
    return call


def _first_node(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else node.kwargs.get("input")
    return first if isinstance(first, fx.Node) else None


# ------------------------------------------------------------------------------------------------------ layers

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Methods whose override would change what a conv/linear layer computes from its weight and bias.
_COMPUTING_METHODS = ("forward", "_conv_forward", "_output_padding", "__call__", "_call_impl", "__getattr__")


def base_class(module: nn.Module) -> type[nn.Module]:
    """The module's class before any ``torch.nn.utils.parametrize`` wrapping."""
    return parametrize.type_before_parametrizations(module)


def plain_layer_family(module: nn.Module) -> type[nn.Module] | None:
    """The torch conv/conv-transpose/linear class whose computation ``module`` runs unchanged, else ``None``.

    A subclass that overrides ``forward`` or ``_conv_forward`` (weight standardisation, TF-"same" padding)
    computes something else from its weight, so folding into it would not be exact.
    """
    cls = base_class(module)
    for family in (*_CONV, *_CONV_T, nn.Linear):
        if issubclass(cls, family):
            extra = cls.__mro__[: cls.__mro__.index(family)]
            if any(name in vars(klass) for klass in extra for name in _COMPUTING_METHODS):
                return None
            return family
    return None


def producer_layer(gm: fx.GraphModule, node: fx.Node | None, padded: bool = False) -> nn.Module | None:
    """The conv/conv-transpose/linear module ``node`` calls with torch's own computation, else ``None``.

    With ``padded``, also a conv subclass that provably pads its input and then convolves with its own weight
    and bias (:func:`fx_lightning.fusion.padded_conv.padded_conv_family`): exact for a fold *after* the layer, not for
    folds into it from before (the padding would see the shift) or merges with other kernels.
    """
    if node is None or node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if plain_layer_family(module) is not None:
        return module
    return module if padded and padded_conv_family(module) is not None else None


def is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def conv_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """The symmetric padding per dimension, or ``None`` for a ``'same'`` padding that pads unevenly."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else None
    return tuple(conv.padding)


# ------------------------------------------------------------------------------------------------------ ranks

_RANK_PRESERVING_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.PReLU,
    nn.Linear,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
)
_RANK_PRESERVING_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    torch.tanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.linear,
    F.dropout,
}


def tensor_rank(gm: fx.GraphModule, node: Any) -> int | None:
    """The number of dimensions of ``node``'s output, from the graph alone or shape propagation; ``None`` if unknown.

    Without shape metadata, ranks are known after ``flatten(x, 1)``, ``nn.Flatten()`` and
    ``view``/``reshape`` to an explicit shape, where a reader asserts it (timm's ``_assert(x.ndim == 4)``),
    and carried through element-wise layers and ``Linear``. Where the graph leaves the rank open, the shapes
    deferred for ``gm`` (:func:`fx_lightning.fusion.shapes.deferred`) are propagated and asked.
    """
    rank = _rank_known(gm, node)
    if rank is None and isinstance(node, fx.Node) and ensure_shapes(gm):
        rank = _rank_known(gm, node)
    return rank


def tensor_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    """``node``'s output shape from shape propagation (run now if deferred for ``gm``); ``None`` if unknown."""
    meta = node.meta.get("tensor_meta")
    if meta is None and ensure_shapes(gm):
        meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _rank_known(gm: fx.GraphModule, node: Any, depth: int = 0) -> int | None:
    if not isinstance(node, fx.Node) or depth > 64:
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    asserted = asserted_rank(node)
    if asserted is not None:
        return asserted
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return 2
        if isinstance(module, _RANK_PRESERVING_MODULES) or is_batch_norm_module(module):
            return _rank_known(gm, _first_node(node), depth + 1)
        return None
    if node.op == "call_function":
        if node.target is torch.flatten:
            args = bind_args(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            return 2 if args["start_dim"] == 1 and args["end_dim"] == -1 else None
        if node.target in _RANK_PRESERVING_FUNCTIONS:
            return _rank_known(gm, _first_node(node), depth + 1)
        return None
    if node.op == "call_method":
        if node.target == "flatten":
            args = bind_args(node, ("self", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            return 2 if args["start_dim"] == 1 and args["end_dim"] == -1 else None
        if node.target in ("view", "reshape") and len(node.args) >= 2:
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return len(shape)
        if node.target in ("relu", "sigmoid", "tanh", "contiguous"):
            return _rank_known(gm, _first_node(node), depth + 1)
    return None


def asserted_rank(node: fx.Node) -> int | None:
    """The rank a reader of ``node`` asserts before anything else can happen: ``_assert(x.ndim == 4, ...)``."""
    for user in node.users:
        if not (user.op == "call_function" and user.target is getattr and user.args[1:] == ("ndim",)):
            continue
        for compare in user.users:
            if compare.op != "call_function" or compare.target is not operator.eq or len(compare.args) != 2:
                continue
            rank = compare.args[1] if compare.args[0] is user else compare.args[0]
            asserted = any(u.op == "call_function" and u.target is torch._assert for u in compare.users)
            if asserted and isinstance(rank, int) and not isinstance(rank, bool):
                return rank
    return None


# ----------------------------------------------------------------------------------------------------- readers

_SHAPE_ATTRS = frozenset({"ndim", "shape", "dtype", "device", "is_cuda"})
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
_LIKE_METHODS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})


def value_users(node: fx.Node) -> list[fx.Node]:
    """The readers of ``node`` that depend on its values, ignoring shape checks such as ``x.ndim == 4``.

    Folding keeps a layer's output shape, dtype and device, so readers of only those are unaffected.
    """
    return [u for u in node.users if not _reads_only_metadata(u, node)]


def _reads_only_metadata(user: fx.Node, node: fx.Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _SHAPE_ATTRS
    if user.op == "call_method" and user.target in _LIKE_METHODS:
        # y.reshape_as(x) reads only x's shape (LeViT's LinearNorm: bn(x.flatten(0, 1)).reshape_as(x)).
        return len(user.args) == 2 and not user.kwargs and user.args[0] is not node and user.args[1] is node
    return user.op == "call_method" and user.target in _SHAPE_METHODS and user.args[0] is node


def users_text(node: fx.Node, besides: fx.Node | None = None) -> str:
    """Names of the nodes reading ``node``'s values, except ``besides``."""
    return ", ".join(u.name for u in value_users(node) if u is not besides)


def describe(node: fx.Node) -> str:
    """A short description of a node for reports: its name and what it calls."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}': {node.op} {target}"


# -------------------------------------------------------------------------------------------------- arithmetic

_ARITHMETIC_FUNCTIONS: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
}
_ARITHMETIC_METHODS: dict[str, str] = {
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "sub_": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "div_": "div",
    "true_divide": "div",
}
#: Arithmetic that writes its result into its first operand.
IN_PLACE_ARITHMETIC = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                 "add_", "sub_", "mul_", "div_"})  # fmt: skip


def arithmetic_operands(node: fx.Node) -> tuple[str, Any, Any, float] | None:
    """``(op, first, second, alpha)`` when ``node`` computes ``first <op> alpha * second`` out of place or in place.

    ``op`` is ``"add"``, ``"sub"``, ``"mul"`` or ``"div"``; ``None`` for anything else, including calls with
    ``out=``, a ``rounding_mode`` or an ``alpha`` that is not a finite number (``alpha`` only with add/sub).
    """
    if node.op == "call_function" and node.target in _ARITHMETIC_FUNCTIONS:
        op = _ARITHMETIC_FUNCTIONS[node.target]
        names = ("input", "other")
    elif node.op == "call_method" and node.target in _ARITHMETIC_METHODS:
        op = _ARITHMETIC_METHODS[node.target]
        names = ("self", "other")
    else:
        return None
    if len(node.args) > 2:
        return None
    args = bind_args(node, names, {"alpha": 1})
    allowed = {*names, "alpha"} | ({"rounding_mode"} if op == "div" else set())
    if set(args) - allowed or args.get("rounding_mode") is not None or len(set(names) & set(args)) != 2:
        return None
    alpha = args["alpha"]
    if not is_number(alpha) or not math.isfinite(alpha) or (op in ("mul", "div") and alpha != 1):
        return None
    return op, args[names[0]], args[names[1]], float(alpha)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------- writes and aliases

_IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem, operator.delitem,
})  # fmt: skip
# Calls whose output is a new tensor, never a view of an input (everything else may alias its inputs).
_FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pow,
    operator.matmul, torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.concat, torch.stack,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
    F.batch_norm, torch.batch_norm, F.relu, torch.relu, F.gelu, F.silu, F.hardswish, F.sigmoid, torch.sigmoid,
    torch.tanh, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, torch.sum, torch.mean,
})  # fmt: skip
_FRESH_METHODS = frozenset({"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "sum", "mean", "abs", "clone"})
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def written_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The argument nodes ``node`` may write into: in-place methods and operators, ``out=``, ``inplace=True``.

    A call of a module that is not torch's own (an untraced part) may write into any of its inputs.
    """
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    out = node.kwargs.get("out")
    written = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, fx.Node)]
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not type(module).__module__.startswith("torch.nn"):
            return written + list(node.all_input_nodes)
        if getattr(module, "inplace", False) and first is not None:
            written.append(first)
        return written
    in_place = False
    if node.op == "call_method":
        name = str(node.target)
        in_place = name.endswith("_") and not name.endswith("__")
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        in_place = node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
        in_place = in_place or node.kwargs.get("inplace") is True
        in_place = in_place or not is_library_function(node.target)  # a wrapped user function: anything goes
    if in_place:
        written += [first] if first is not None else list(node.all_input_nodes)
    return written


def is_library_function(target: Any) -> bool:
    """Whether a called function comes from torch or Python itself (not a user function kept by ``fx.wrap``)."""
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math", "torchvision", "timm")


def _aliases_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output may share memory with one of its inputs (a view, or the input itself)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not type(module).__module__.startswith("torch.nn"):
            return True
        return isinstance(module, _ALIASING_MODULES) or bool(getattr(module, "inplace", False))
    if node.op == "call_function":
        return node.target not in _FRESH_FUNCTIONS or bool(node.kwargs.get("inplace"))
    if node.op == "call_method":
        return str(node.target) not in _FRESH_METHODS
    return False


def alias_group(gm: fx.GraphModule, node: fx.Node) -> set[fx.Node]:
    """The nodes whose values may share memory with ``node``'s: connected to it through views and in-place calls."""
    group = {node}
    frontier = [node]
    while frontier:
        current = frontier.pop()
        linked = [u for u in current.users if _aliases_input(gm, u)]
        if _aliases_input(gm, current):
            linked += current.all_input_nodes
        for other in linked:
            if other not in group:
                group.add(other)
                frontier.append(other)
    return group


def written_between(gm: fx.GraphModule, value: fx.Node, after: fx.Node, before: fx.Node) -> fx.Node | None:
    """The first node strictly between ``after`` and ``before`` (graph order) that may write into ``value``.

    Moving a read of ``value`` from ``after``'s position to ``before``'s is exact only when this is ``None``.
    """
    group = alias_group(gm, value)
    node = after.next
    while node is not before and node.op != "root":
        if any(w in group for w in written_inputs(gm, node)):
            return node
        node = node.next
    return None

"""Graph helpers the passes share: recognising BatchNorm calls, tensor ranks, and swapping in folded layers."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from fx_lightning.folding import BatchNormStats
from fx_lightning.report import Folded, Merged, Removed
from fx_lightning.tracing import is_batch_norm_module


@dataclass
class PassResult:
    """What one pass changed: the folds and removals it made, and why it left BatchNorm calls alone."""

    folded: list[Folded] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    merged: list[Merged] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.folded or self.removed or self.merged)


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

    ``stats`` is ``None`` when the call cannot be folded exactly; ``reason`` then says why.
    """

    node: fx.Node
    input: fx.Node | None
    name: str
    num_features: int
    stats: BatchNormStats | None
    reason: str = ""
    module: nn.Module | None = None


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
    return bool(module._forward_hooks or module._forward_pre_hooks)


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


def foldable_batch_norms(gm: fx.GraphModule, result: PassResult) -> Iterator[BatchNormCall]:
    """Yield every BatchNorm call in ``gm`` whose statistics allow a fold; record in ``result`` why others do not.

    The node list is taken up front, so a caller may erase the yielded node.
    """
    for node in list(gm.graph.nodes):
        bn = match_batch_norm(gm, node)
        if bn is None:
            continue
        if bn.stats is None:
            result.reasons[node.name] = bn.reason
            continue
        yield bn


def fold_into_layer(
    gm: fx.GraphModule,
    bn: BatchNormCall,
    layer_node: fx.Node,
    folded: tuple[torch.Tensor, torch.Tensor],
    rule: str,
    result: PassResult,
) -> None:
    """Give ``layer_node`` a layer carrying the ``folded`` weight and bias, drop ``bn``'s call, and record it."""
    layer = gm.get_submodule(layer_node.target)
    target = install_for_node(gm, layer_node, with_new_params(layer, *folded))
    assert bn.input is not None  # a foldable BatchNorm call always has a tensor input
    replace_with_input(bn.node, bn.input)
    result.folded.append(Folded(bn.name, target, rule))


def _match_module_bn(node: fx.Node, bn: nn.Module) -> BatchNormCall:
    mean, var = bn.running_mean, bn.running_var
    num_features = getattr(bn, "num_features", mean.numel() if mean is not None and not is_lazy(mean) else -1)
    call = BatchNormCall(node, _first_node(node), str(node.target), num_features, None, module=bn)
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


def tensor_rank(gm: fx.GraphModule, node: Any, depth: int = 0) -> int | None:
    """The number of dimensions of ``node``'s output, from shape propagation or the graph alone; ``None`` if unknown.

    Without shape metadata, ranks are known after ``flatten(x, 1)``, ``nn.Flatten()`` and
    ``view``/``reshape`` to an explicit shape, and carried through element-wise layers and ``Linear``.
    """
    if not isinstance(node, fx.Node) or depth > 64:
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return 2
        if isinstance(module, _RANK_PRESERVING_MODULES) or is_batch_norm_module(module):
            return tensor_rank(gm, _first_node(node), depth + 1)
        return None
    if node.op == "call_function":
        if node.target is torch.flatten:
            args = bind_args(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            return 2 if args["start_dim"] == 1 and args["end_dim"] == -1 else None
        if node.target in _RANK_PRESERVING_FUNCTIONS:
            return tensor_rank(gm, _first_node(node), depth + 1)
        return None
    if node.op == "call_method":
        if node.target == "flatten":
            args = bind_args(node, ("self", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            return 2 if args["start_dim"] == 1 and args["end_dim"] == -1 else None
        if node.target in ("view", "reshape") and len(node.args) >= 2:
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return len(shape)
        if node.target in ("relu", "sigmoid", "tanh", "contiguous"):
            return tensor_rank(gm, _first_node(node), depth + 1)
    return None


def base_class(module: nn.Module) -> type[nn.Module]:
    """The module's class before any ``torch.nn.utils.parametrize`` wrapping."""
    return parametrize.type_before_parametrizations(module)


def with_new_params(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A new module of ``module``'s (unparametrised) class and settings, carrying ``weight`` and ``bias``.

    The original keeps its own parameters, so other call sites and tied layers are unaffected.
    """
    cls = base_class(module)
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    new._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    new._buffers = dict(module._buffers)
    requires_grad = bool(module.weight.requires_grad)
    new._parameters = {
        "weight": nn.Parameter(weight, requires_grad=requires_grad),
        "bias": nn.Parameter(bias, requires_grad=requires_grad),
    }
    new.__dict__["_forward_hooks"] = type(module._forward_hooks)()
    new.__dict__["_forward_pre_hooks"] = type(module._forward_pre_hooks)()
    new.training = False
    return new


def conv_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """The symmetric padding per dimension, or ``None`` for a ``'same'`` padding that pads unevenly."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else None
    return tuple(conv.padding)


def install_for_node(gm: fx.GraphModule, node: fx.Node, new_module: nn.Module) -> str:
    """Make ``node`` call ``new_module``; reuse its path when no other node calls it, else add a sibling.

    Returns the path ``node`` now calls.
    """
    target = str(node.target)
    sites = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if len(sites) > 1:
        suffix = 1
        while _has_submodule(gm, f"{target}_folded{suffix}"):
            suffix += 1
        target = f"{target}_folded{suffix}"
        node.target = target
    gm.add_submodule(target, new_module)
    return target


def _has_submodule(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return False
    return True


def replace_with_input(node: fx.Node, value: fx.Node) -> None:
    """Reroute every reader of ``node`` to ``value`` and erase ``node``."""
    node.replace_all_uses_with(value)
    node.graph.erase_node(node)


def users_text(node: fx.Node, besides: fx.Node | None = None) -> str:
    """Names of the nodes reading ``node``'s values, except ``besides``."""
    return ", ".join(u.name for u in value_users(node) if u is not besides)


def describe(node: fx.Node) -> str:
    """A short description of a node for reports: its name and what it calls."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}': {node.op} {target}"


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


_IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem, operator.delitem,
})  # fmt: skip


def erase_dead_code(gm: fx.GraphModule) -> int:
    """Erase the nodes nothing reads that surely have no side effect; returns how many were erased.

    torch.fx's ``Graph.eliminate_dead_code`` also erases an in-place call whose result is unused, such as
    timm NFNet's ``out.mul_(self.skipinit_gain)`` written as a statement, which changes what the model
    computes. Here a node goes only when it is a ``get_attr``, a built-in ``torch.nn`` module call without
    ``inplace=True``, or a function or method call that is not in place (no trailing ``_``, no augmented
    assignment, no ``True`` argument that could be an ``inplace`` flag) and not otherwise impure.
    """
    erased = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and _surely_pure(gm, node):
            gm.graph.erase_node(node)
            erased += 1
    return erased


def _surely_pure(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method", "call_module") or node.is_impure():
        return False
    if any(a is True for a in (*node.args, *node.kwargs.values())):
        return False  # possibly inplace=True
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return type(module).__module__.startswith("torch.nn.modules") and not getattr(module, "inplace", False)
    if node.op == "call_method":
        return not str(node.target).endswith("_")
    name = getattr(node.target, "__name__", "")
    return node.target not in _IN_PLACE_OPERATORS and not (name.endswith("_") and not name.endswith("__"))

"""Remove calls that are the identity at inference: Dropout of every kind in eval, stochastic depth, ``nn.Identity``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fx_lightning.passes.common import PassResult, bind_args, has_hooks, replace_with_input
from fx_lightning.report import Removed

_NO_OP_MODULES = (nn.modules.dropout._DropoutNd, nn.Identity)
# Functional dropouts are no-ops only when called with training=False (their default is True).
_FUNCTIONAL_DROPOUT = {
    F.dropout: ("input", "p", "training", "inplace"),
    F.dropout1d: ("input", "p", "training", "inplace"),
    F.dropout2d: ("input", "p", "training", "inplace"),
    F.dropout3d: ("input", "p", "training", "inplace"),
    F.alpha_dropout: ("input", "p", "training", "inplace"),
    F.feature_alpha_dropout: ("input", "p", "training", "inplace"),
    torch.dropout: ("input", "p", "train"),
    torch.alpha_dropout: ("input", "p", "train"),
    torch.feature_alpha_dropout: ("input", "p", "train"),
}


def remove_dropout(gm: fx.GraphModule) -> PassResult:
    """Reroute readers of eval-mode Dropout, stochastic depth and Identity calls to their input; erase the calls.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        A :class:`PassResult` listing every removed call.
    """
    result = PassResult()
    for node in list(gm.graph.nodes):
        kind = _no_op_kind(gm, node)
        if kind and node.args and isinstance(node.args[0], fx.Node):
            result.removed.append(Removed(str(node.target) if node.op == "call_module" else node.name, kind))
            replace_with_input(node, node.args[0])
    return result


def _no_op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _NO_OP_MODULES) and not module.training and not has_hooks(module):
            return type(module).__name__
        return ""
    if node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUT:
        names = _FUNCTIONAL_DROPOUT[node.target]
        args = bind_args(node, names, {"training": True, "train": True})
        if args.get(names[2]) is False:
            return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and _is_stochastic_depth(node.target):
        args = bind_args(node, ("input", "p", "mode", "training"), {"training": True})
        if args["training"] is False or args.get("p") == 0:
            return "stochastic_depth"
    return ""


def _is_stochastic_depth(target: object) -> bool:
    # torchvision.ops.stochastic_depth, matched by name so that torchvision need not be imported here.
    return (
        getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth"
        and getattr(target, "__name__", None) == "stochastic_depth"
    )

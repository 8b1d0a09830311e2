"""Remove calls that are the identity at inference: Dropout of every kind in eval, stochastic depth, ``nn.Identity``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fx_lightning.fusion.passes.matching import bind_args, has_hooks
from fx_lightning.fusion.passes.rewriting import PassChanges, Rewrite, replace_with_input, scope_of
from fx_lightning.fusion.report import Removed

RULE = "remove_dropout"

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


def remove_dropout(gm: fx.GraphModule) -> PassChanges:
    """Reroute readers of eval-mode Dropout, stochastic depth and Identity calls to their input; erase the calls.

    The calls stay in the user's module tree (a Dropout there can be switched back on, as MC dropout does): each
    rewrite has no module swaps. The readers of a removed Dropout *module* remember the input they now read
    (``node.meta["bypassed"]``), so that a fold across it is written as generated code, never into the tree.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        :class:`PassChanges` listing every removed call.
    """
    result = PassChanges()
    for node in list(gm.graph.nodes):
        kind = _no_op_kind(gm, node)
        if kind and node.args and isinstance(node.args[0], fx.Node):
            name = str(node.target) if node.op == "call_module" else node.name
            source = node.args[0]
            if node.op == "call_module" and isinstance(gm.get_submodule(name), nn.modules.dropout._DropoutNd):
                for reader in node.users:
                    reader.meta.setdefault("bypassed", set()).add(source)
            rewrite = Rewrite(RULE, [Removed(name, kind)], scope=scope_of([node]), swaps={})
            replace_with_input(node, source)
            result.rewrites.append(rewrite)
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

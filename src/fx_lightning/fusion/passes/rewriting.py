"""Rewriting fx graphs: the facts a pass records about each rewrite, and the helpers that change a graph.

A pass returns :class:`PassChanges`: one :class:`Rewrite` per change, each with the report records it makes and
the facts :func:`fx_lightning.fuse` needs to write it back into the user's module tree (:attr:`Rewrite.swaps`)
or, where that cannot express it, to replace the smallest enclosing module by generated code
(:attr:`Rewrite.scope`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fx_lightning.fusion.passes.matching import base_class, is_library_function, written_inputs
from fx_lightning.fusion.report import Folded, Merged, Removed

#: The value of a :attr:`Rewrite.swaps` entry whose module (a BatchNorm, or a module around a functional
#: BatchNorm call) becomes a pass-through of its input.
PASS_THROUGH = None


@dataclass
class Rewrite:
    """One rewrite of a graph, as facts.

    Attributes:
        rule: the pass that made it.
        records: what the report says of it.
        scope: qualified name (relative to the traced module) of the smallest module whose forward holds every
            node the rewrite touched; ``""`` for the traced module itself.
        swaps: when the rewrite is exactly "these modules replaced at their paths", path -> new module
            (:data:`PASS_THROUGH` for a BatchNorm that becomes a pass-through); ``None`` when it needs generated
            code (merged branches, folds into functional calls, a layer folded at one of several call sites...).
        seen: path -> the module object the pass rewrote there; a swap applies only where this is still the
            module the tree holds.
    """

    rule: str
    records: list[Folded | Merged | Removed]
    scope: str = ""
    swaps: dict[str, nn.Module | None] | None = None
    seen: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class PassChanges:
    """What one pass changed (its rewrites), and why it left BatchNorm calls alone (node name -> reason)."""

    rewrites: list[Rewrite] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def folded(self) -> list[Folded]:
        return [r for rw in self.rewrites for r in rw.records if isinstance(r, Folded)]

    @property
    def merged(self) -> list[Merged]:
        return [r for rw in self.rewrites for r in rw.records if isinstance(r, Merged)]

    @property
    def removed(self) -> list[Removed]:
        return [r for rw in self.rewrites for r in rw.records if isinstance(r, Removed)]

    @property
    def modified(self) -> bool:
        return bool(self.rewrites)


def scope_of(nodes: Iterable[fx.Node]) -> str:
    """The qualified name of the deepest module whose forward created every one of ``nodes`` (``""``: the root).

    Read from the ``nn_module_stack`` torch.fx records on each node; a module call belongs to its caller's forward.
    A node without that record (made by a pass that did not copy it) counts as the root's.
    """
    common: list[str] | None = None
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [value[0] for value in stack.values()]
        if node.op == "call_module" and paths:
            paths = paths[:-1]
        if common is None:
            common = paths
        else:
            size = 0
            while size < min(len(common), len(paths)) and common[size] == paths[size]:
                size += 1
            common = common[:size]
    return common[-1] if common else ""


def with_new_params(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A new module of ``module``'s (unparametrised) class and settings, carrying ``weight`` and ``bias``.

    The original keeps its own parameters, so other call sites and tied layers are unaffected.
    """
    cls = base_class(module)
    new = object.__new__(cls)
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


def install_for_node(gm: fx.GraphModule, node: fx.Node, new_module: nn.Module) -> str:
    """Make ``node`` call ``new_module``; reuse its path when nothing else reaches that module, else add a sibling.

    The module stays at its path for any other node calling it, fetching one of its tensors (``conv.weight``
    read elsewhere) or calling a module that contains it. Returns the path ``node`` now calls.
    """
    target = str(node.target)
    if module_reached_elsewhere(gm, target, besides=node):
        suffix = 1
        while _has_submodule(gm, f"{target}_folded{suffix}"):
            suffix += 1
        target = f"{target}_folded{suffix}"
        node.target = target
    gm.add_submodule(target, new_module)
    return target


def module_reached_elsewhere(gm: fx.GraphModule, path: str, besides: fx.Node) -> bool:
    """Whether a node other than ``besides`` calls the module at ``path``, an ancestor or a part of it (a
    parametrization), or fetches one of its tensors."""
    ancestors = {path.rsplit(".", i)[0] for i in range(1, path.count(".") + 1)}
    for other in gm.graph.nodes:
        if other is besides:
            continue
        target = str(other.target)
        if other.op == "call_module" and (target == path or target in ancestors or target.startswith(path + ".")):
            return True
        if other.op == "get_attr" and target.startswith(path + "."):
            return True
    return False


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


def copy_scope(new: fx.Node, old: fx.Node) -> None:
    """Give a node a pass creates the module stack of the node it stands for (see :func:`scope_of`)."""
    if "nn_module_stack" in old.meta:
        new.meta["nn_module_stack"] = dict(old.meta["nn_module_stack"])


def erase_dead_code(gm: fx.GraphModule) -> int:
    """Erase the nodes nothing reads that surely have no side effect; returns how many were erased.

    torch.fx's ``Graph.eliminate_dead_code`` also erases an in-place call whose result is unused, such as
    timm NFNet's ``out.mul_(self.skipinit_gain)`` written as a statement, which changes what the model
    computes. Here a node goes only when it is a ``get_attr``, a built-in ``torch.nn`` module call without
    ``inplace=True``, or a library function or method call that writes into nothing (no trailing ``_``, no
    augmented assignment, no ``out=``, no ``True`` argument that could be an ``inplace`` flag) and is not
    otherwise impure. A user function kept whole by ``torch.fx.wrap`` may do anything and stays.
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
    if any(a is True for a in (*node.args, *node.kwargs.values())) or "out" in node.kwargs:
        return False  # possibly inplace=True, or writes into out=
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return type(module).__module__.startswith("torch.nn.modules") and not getattr(module, "inplace", False)
    if node.op == "call_function" and not is_library_function(node.target):
        return False
    return not written_inputs(gm, node)

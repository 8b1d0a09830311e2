"""A faster generated ``forward`` for fused graphs: sub-module calls through ``_modules`` lookups.

torch.fx writes a call to the sub-module ``blocks.0.conv`` as ``getattr(self.blocks, "0").conv(x)``. Each
``.`` there is a miss on the instance ``__dict__`` that falls back to ``nn.Module.__getattr__``, a Python
function: about 1 us per step on a 2-core CPU, so a deep fused network pays tens of microseconds per call
that its hand-written equivalent does not. :class:`DirectSubmoduleCalls` rewrites those calls to
``self._modules["blocks"]._modules["0"]._modules["conv"](x)``: plain dict lookups, read on every call, so
a sub-module replaced later (``setattr``, ``add_module``, ``add_submodule``) is still the one called.

It is installed with the public ``Graph.on_generate_code`` hook, so it survives ``recompile()`` and
``copy.deepcopy``. A call whose text it does not recognise is left as torch.fx wrote it (correct, only
not faster). TorchScript cannot read ``_modules``; :class:`FusedGraphModule` therefore hands
``torch.jit.script`` a copy generated without the rewrite, sharing the same sub-modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import fx

BodyTransformer = Callable[[list[str]], list[str]]


def attribute_chain(base: str, target: str) -> str:
    """The expression torch.fx generates for the attribute path ``target`` of ``base``."""
    expression = base
    for name in target.split("."):
        expression = f"{expression}.{name}" if name.isidentifier() else f'getattr({expression}, "{name}")'
    return expression


def modules_lookup(base: str, target: str) -> str:
    """The same sub-module reached through ``_modules`` dict lookups."""
    return base + "".join(f"._modules[{name!r}]" for name in target.split("."))


class DirectSubmoduleCalls:
    """A body transformer rewriting the calls of the given sub-module paths (see the module docstring).

    Args:
        targets: qualified names of the sub-modules the graph calls (``call_module`` targets).
        previous: the transformer that was registered before this one, applied first.
        root: the name the generated code uses for the module itself.
        attributes: qualified names of the tensors the graph fetches (``get_attr`` targets); the modules on
            their path are reached the same way, the tensor itself by plain attribute access.
    """

    def __init__(
        self,
        targets: frozenset[str],
        previous: BodyTransformer | None = None,
        root: str = "self",
        attributes: frozenset[str] = frozenset(),
    ) -> None:
        self.targets = targets
        self.previous = previous
        self.root = root
        self.attributes = attributes

    def __call__(self, body: list[str]) -> list[str]:
        if self.previous is not None:
            body = self.previous(body)
        calls = {f" = {attribute_chain(self.root, t)}(": f" = {modules_lookup(self.root, t)}(" for t in self.targets}
        fetches = {}
        for target in self.attributes:
            owner, _, name = target.rpartition(".")
            fetches[f" = {attribute_chain(self.root, target)}"] = (
                f" = {attribute_chain(modules_lookup(self.root, owner), name)}"
            )
        return [_rewrite_fetch(_rewrite_call(fragment, calls), fetches) for fragment in body]


def _rewrite_fetch(fragment: str, fetches: dict[str, str]) -> str:
    # A get_attr fragment reads "name = <chain>" with nothing after the chain.
    start = fragment.find(" = ")
    new = fetches.get(fragment[start:]) if start >= 0 else None
    return fragment if new is None else fragment[:start] + new


def _rewrite_call(fragment: str, calls: dict[str, str]) -> str:
    # A call_module fragment reads "name = <chain>(args)" (or "name : T = ..."): the chain follows the first " = ".
    start = fragment.find(" = ")
    if start < 0:
        return fragment
    # The chain itself may contain "getattr(": try each opening parenthesis as the call's.
    end = fragment.find("(", start)
    while end >= 0:
        new = calls.get(fragment[start : end + 1])
        if new is not None:
            return fragment[:start] + new + fragment[end + 1 :]
        end = fragment.find("(", end + 1)
    return fragment


def install_direct_calls(gm: fx.GraphModule) -> None:
    """Make ``gm``'s generated forward call its sub-modules through ``_modules`` lookups, then recompile."""
    targets = frozenset(str(node.target) for node in gm.graph.nodes if node.op == "call_module")
    attributes = frozenset(str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and "." in str(n.target))
    gm.graph.on_generate_code(
        lambda current: DirectSubmoduleCalls(targets, _without_direct_calls(current), attributes=attributes)
    )
    gm.recompile()


def _without_direct_calls(transformer: BodyTransformer | None) -> BodyTransformer | None:
    while isinstance(transformer, DirectSubmoduleCalls):
        transformer = transformer.previous
    return transformer


class FusedGraphModule(fx.GraphModule):
    """The ``GraphModule`` that :func:`fx_lightning.fuse` returns: as torch.fx's, plus a TorchScript hook.

    ``torch.jit.script`` calls ``__prepare_scriptable__`` first; the copy it gets has the forward torch.fx
    writes (TorchScript cannot read ``_modules``) and the same sub-modules, parameters and buffers.
    """

    def __prepare_scriptable__(self) -> fx.GraphModule:
        graph = copy.deepcopy(self.graph)
        graph.on_generate_code(_without_direct_calls)
        return fx.GraphModule(self, graph, type(self).__name__)

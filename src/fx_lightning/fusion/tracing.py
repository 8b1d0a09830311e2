"""Turn an ``nn.Module`` into torch.fx graphs without touching the caller's model.

Two pieces:

* :func:`detached_copy` builds an eval-mode copy of a module tree whose parameters are new ``Parameter``
  objects sharing storage with the original (no weight memory is duplicated) and whose buffers are
  cloned (they are small, and an unfolded BatchNorm put back in train mode would otherwise write into
  the caller's running statistics).
* :func:`trace` traces as much as torch.fx can: a sub-module whose own code cannot be traced is kept as
  a leaf call and the trace of its parent is retried, so the traced region is as large as possible.
"""

from __future__ import annotations

import collections
import copy
import inspect
import operator
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.proxy import TraceError
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from fx_lightning.fusion.codegen import FusedGraphModule
from fx_lightning.fusion.padded_conv import padded_conv_family, reads_only_settings

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


_INTERNAL_ATTRIBUTES = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", *_HOOK_DICTS})


def detached_copy(module: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``module`` that shares parameter storage but no Python objects with it.

    Tied parameters and sub-modules used at several places stay tied in the copy. Dicts, lists and sets held
    as attributes are copied one level deep (caches a forward fills while traced stay in the copy). Changing the copy's
    modules, ``training`` flags, dtype or device (``.to()`` rebinds ``.data`` of the copy's own
    ``Parameter`` objects) leaves the original as it was; writing *in place* into a shared parameter's
    storage would not, so treat the copy's parameters as read-only.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> copy = detached_copy(net)
        >>> copy.training, net.training, copy[0].weight is net[0].weight
        (False, True, False)
    """
    memo: dict[int, Any] = {}
    return _copy_module(module, memo)


def _copy_tensor(t: torch.Tensor | None, memo: dict[int, Any], *, clone: bool) -> Any:
    if t is None:
        return None
    if id(t) in memo:
        return memo[id(t)]
    if is_lazy(t):
        new: Any = t  # an uninitialised lazy tensor has no storage to share; materialising it is the owner's job
    elif isinstance(t, nn.Parameter):
        new = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
    else:
        new = t.detach().clone() if clone else t
    memo[id(t)] = new
    return new


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    # object.__new__, not cls.__new__: torch.fx's GraphModule.__new__ makes a fresh class without the generated
    # forward, so a copied GraphModule (fuse(fuse(m)), fuse(symbolic_trace(m))) would lose its forward.
    new = object.__new__(cls)
    memo[id(module)] = new
    # Written into __dict__ directly: nn.Module.__setattr__ would look each name up in the three dicts first.
    state = new.__dict__ = dict(module.__dict__)
    state["_parameters"] = {k: _copy_tensor(p, memo, clone=False) for k, p in module._parameters.items()}
    state["_buffers"] = {k: _copy_tensor(b, memo, clone=True) for k, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {k: (_copy_module(m, memo) if m is not None else None) for k, m in module._modules.items()}
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            state[name] = collections.OrderedDict(module.__dict__[name])
    for name, value in module.__dict__.items():
        # Containers a forward may write into while being traced (timm LeViT's attention-bias cache stores a
        # Proxy keyed by device): one level copied, so those writes land in the copy, not the caller's model.
        if name not in _INTERNAL_ATTRIBUTES and isinstance(value, (dict, list, set)):
            if id(value) not in memo:
                memo[id(value)] = copy.copy(value)
            state[name] = memo[id(value)]
    state["training"] = False
    return new


# Modules that compute an inference BatchNorm from buffers ``weight``, ``bias``, ``running_mean``,
# ``running_var`` and an ``eps`` attribute, without subclassing ``_BatchNorm``; by qualified class name,
# so that the library need not be imported.
FROZEN_BATCH_NORM_CLASSES = {"torchvision.ops.misc.FrozenBatchNorm2d"}


def is_builtin_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that runs torch's own ``_BatchNorm`` forward (subclasses included)."""
    if not isinstance(module, _BatchNorm):
        return False
    forward = type(module).forward
    return getattr(forward, "__module__", "").startswith("torch.nn.")


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`FROZEN_BATCH_NORM_CLASSES` (e.g. torchvision's FrozenBatchNorm2d)."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" in FROZEN_BATCH_NORM_CLASSES


def contains_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` or any sub-module is a BatchNorm of any kind (subclasses and frozen ones included)."""
    return any(isinstance(m, _BatchNorm) or is_frozen_batch_norm(m) for m in module.modules())


def is_batch_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is called as one BatchNorm in a traced graph (a leaf the passes can fold)."""
    return is_builtin_batch_norm(module) or is_frozen_batch_norm(module)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or forward pre-hooks (which torch.fx does not trace)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class InPlaceProxy(fx.Proxy):
    """A ``Proxy`` that records augmented assignments (``x += y``) as the in-place operators they are.

    ``fx.Proxy`` defines no ``__iadd__``, so Python falls back to ``x = x + y``: the traced program then writes
    into a new tensor, and a view taken of ``x`` before (``h = x.flatten(1); x += y; return h``) loses the write.
    """


def _in_place(op: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "imatmul"):
    setattr(InPlaceProxy, f"__{_name}__", _in_place(getattr(operator, _name)))


class LeafTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` with extra leaves, faithful in-place operators, and a record of where a trace failed.

    Leaves are torch's own modules, BatchNorm subclasses that keep torch's forward (their
    ``_check_input_dim`` cannot be traced), modules with forward hooks (tracing through them would drop the
    hooks), and the modules named in ``leaves``. ``hooked`` collects the qualified names of the hooked leaves.
    """

    def __init__(
        self,
        leaves: Iterable[str] = (),
        leaf_types: tuple[type, ...] = (),
        wrapped: Iterable[Any] = (),
        *,
        recover: bool = False,
    ) -> None:
        super().__init__(autowrap_functions=tuple(wrapped))
        self.leaves = set(leaves)
        self.leaf_types = leaf_types
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None
        self.hooked: set[str] = set()
        # With ``recover``, a sub-module whose own code fails to trace is called as a leaf from there on, and the
        # trace goes on: one trace finds every such sub-module (``recovered``: path -> the tracer's error).
        self.recover = recover
        self.recovered: dict[str, str] = {}
        self.abandoned = False  # a failure recovering cannot handle (see call_module): the trace fails as it is

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InPlaceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or is_batch_norm_module(m):
            return True
        if has_forward_hooks(m) and module_qualified_name:
            self.hooked.add(module_qualified_name)
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if padded_conv_family(m) is not None:
            return True  # called whole, so that a BatchNorm after it folds into it (its own trace may not exist)
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = self.path_of_module(m)
        self.stack.append(name)
        # Where to roll back to, in the trace that recovers (whose graph is only used when nothing was rolled back).
        mark = (self.graph._root.prev, collections.OrderedDict(self.module_stack)) if self.recover else None
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            innermost = self.failed_in is None
            if innermost:
                self.failed_in = list(self.stack)
            if mark is None or not (innermost and name and _is_trace_error(err)) or self.abandoned:
                raise
            if _failed_callee(err, m) is not None:
                self.abandoned = True  # the callee is recorded as one call instead, in a trace of its own
                raise
            self._roll_back(*mark)
            self.recovered[name] = f"{type(err).__name__}: {err}"
            self.leaves.add(name)
            self.failed_in = None
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()

    def _roll_back(self, last: fx.Node, module_stack: dict[str, Any]) -> None:
        """Erase the nodes a failed call made after ``last`` and restore the module stack as it was before it."""
        while self.graph._root.prev is not last:
            self.graph.erase_node(self.graph._root.prev)
        self.module_stack.clear()
        self.module_stack.update(module_stack)


@dataclass
class TraceResult:
    """A traced module (or ``None``) and the sub-modules that had to stay opaque, with the tracer's errors."""

    graph_module: fx.GraphModule | None
    opaque: dict[str, str] = field(default_factory=dict)
    error: str = ""
    hooked: set[str] = field(default_factory=set)


def trace(root: nn.Module, leaf_types: tuple[type, ...] = (), max_retries: int = 200) -> TraceResult:
    """Trace ``root``, making every sub-module whose own code fails to trace a leaf and retrying.

    Returns a result whose ``graph_module`` is ``None`` when ``root``'s own forward cannot be traced;
    ``error`` then holds the tracer's message. ``opaque`` maps each sub-module kept as a leaf because
    of a trace failure to its error message.
    """
    opaque: dict[str, str] = {}
    # Callables a forward calls that failed to trace (shape arithmetic in Hugging Face's apply_tf_padding, a
    # ModelOutput built from proxies), recorded as single calls instead: culprit path and message for each.
    wrapped: dict[Any, tuple[str, str]] = {}
    containers = _containers(root)
    for attempt in range(max_retries):
        # The first trace recovers from each failing sub-module in place, which finds most of them at once; a graph
        # is returned only from a trace that had every opaque sub-module as a leaf from the start.
        tracer = LeafTracer(leaves=opaque, leaf_types=leaf_types, wrapped=wrapped, recover=attempt == 0)
        try:
            graph = tracer.trace(root)
        except Exception as err:  # noqa: BLE001 - any tracer failure means "not traceable here"
            _restore(containers)
            opaque.update(tracer.recovered)
            message = f"{type(err).__name__}: {err}"
            culprit = tracer.failed_in[-1] if tracer.failed_in else ""
            callee = _failed_callee(err, _find_module(root, culprit))
            if callee is not None and callee not in wrapped:
                wrapped[callee] = (culprit, message)
                continue
            if not culprit or culprit in opaque:
                return TraceResult(None, opaque, message)
            opaque[culprit] = message
            continue
        _restore(containers)
        if tracer.recovered:
            opaque.update(tracer.recovered)
            continue
        unproven = _unproven_wrapped_call(graph, tracer.root, wrapped)
        if unproven is not None:
            culprit, message = wrapped.pop(unproven)
            if not culprit or culprit in opaque:
                return TraceResult(None, opaque, message)
            opaque[culprit] = message
            continue
        name = type(root).__name__
        return TraceResult(FusedGraphModule(tracer.root, graph, name), opaque, hooked=tracer.hooked)
    return TraceResult(None, opaque, f"gave up after {max_retries} opaque sub-modules")


def _is_trace_error(err: BaseException) -> bool:
    """Whether ``err`` comes from torch.fx itself (a Proxy used as a value), not from the module's own code: only
    then is calling the module whole what its code does. A module that raises on its own (and a caller that catches
    it and falls back) is traced as it runs."""
    if isinstance(err, TraceError):
        return True
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    return bool(frames) and "/torch/fx/" in frames[-1].f_code.co_filename.replace("\\", "/")


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _find_attr(root: nn.Module, target: str) -> Any:
    if not target:
        return root  # the traced module itself, passed on as `self`
    owner, _, name = target.rpartition(".")
    module = _find_module(root, owner)
    return getattr(module, name, None) if module is not None else None


def _find_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _failed_callee(err: BaseException, module: nn.Module | None) -> Any:
    """The function or class that ``module``'s own forward was calling when tracing failed, when the forward
    names it as a global (so torch.fx can record it as one call): else ``None``.

    Recording such a call whole is at least as faithful as tracing through it: at run time the callable runs
    on the same arguments, with its own control flow on real values.
    """
    if module is None:
        return None
    forward = getattr(type(module).forward, "__code__", None)
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    here = [i for i, f in enumerate(frames) if f.f_code is forward and f.f_locals.get("self") is module]
    if not here or here[-1] + 1 >= len(frames):
        return None
    caller, callee = frames[here[-1]], frames[here[-1] + 1]
    for value in list(caller.f_globals.values()):
        if inspect.isfunction(value) and value.__code__ is callee.f_code:
            return None if value.__module__.startswith("torch.") else value
    instance = callee.f_locals.get("self")
    if callee.f_code.co_name in ("__init__", "__post_init__") and instance is not None:
        cls = type(instance)
        if any(v is cls for v in list(caller.f_globals.values())) and not issubclass(cls, (nn.Module, torch.Tensor)):
            return None if cls.__module__.startswith("torch.") else cls
    return None


def _unproven_wrapped_call(graph: fx.Graph, root: nn.Module, wrapped: dict[Any, tuple[str, str]]) -> Any:
    """A wrapped callable given a module of the model that it may read more than the settings of, else ``None``.

    A fold replaces such a module's weight: only code that reads nothing but its settings (``stride``,
    ``kernel_size``) sees no difference.
    """
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in wrapped:
            continue
        try:
            names = list(inspect.signature(node.target).parameters)
        except (TypeError, ValueError):
            names = []
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        for name, value in bound.items():
            for arg in _flat_nodes(value):
                if arg.op != "get_attr" or not isinstance(_find_attr(root, str(arg.target)), nn.Module):
                    continue
                if not inspect.isfunction(node.target) or not reads_only_settings(node.target, name):
                    return node.target
        if len(node.args) > len(names) and any(isinstance(a, fx.Node) for a in node.args[len(names) :]):
            return node.target
    return None


def _containers(root: nn.Module) -> list[tuple[Any, Any]]:
    """Every dict, list and set attribute in the tree, with a shallow copy of its contents."""
    found: dict[int, tuple[Any, Any]] = {}
    for module in root.modules():
        for name, value in vars(module).items():
            if name not in _INTERNAL_ATTRIBUTES and isinstance(value, (dict, list, set)):
                found.setdefault(id(value), (value, copy.copy(value)))
    return list(found.values())


def _restore(containers: list[tuple[Any, Any]]) -> None:
    """Put back what tracing wrote into the tree's containers (timm caches a Proxy per device during a trace,
    which a later trace of a part of the same tree would otherwise read as a value of another graph)."""
    for container, saved in containers:
        if isinstance(container, list):
            container[:] = saved
        else:
            container.clear()
            container.update(saved)

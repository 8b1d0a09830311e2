"""Rules read from source code: convolutions that pad and then convolve, and helpers that read only a layer's settings.

Folding a BatchNorm into the convolution before it scales the weight per output channel and adds a bias:
``bn(conv(z, w, b)) == conv(z, w * s, (b - mean) * s + beta)`` for *any* input ``z``. So a conv subclass whose
forward first computes its input from ``x`` (TF-"same" padding: ``F.pad``, ``nn.ZeroPad2d``, padding computed
from ``x.shape``) and then convolves it with its own ``weight`` and ``bias`` folds exactly, as long as nothing
before the convolution reads the weight's or bias's values. :func:`padded_conv_family` proves that from the
forward's source (smp's ``Conv2dStaticSamePadding``/``Conv2dDynamicSamePadding``, timm's ``Conv2dSame``);
whatever it cannot prove is not folded into.

:func:`reads_only_settings` proves that a function given a layer reads only its settings (``stride``,
``kernel_size``, ...), which folding leaves as they are (Hugging Face's ``apply_tf_padding(x, conv)``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Attributes of a conv layer that folding leaves unchanged.
SETTINGS = frozenset(
    {"stride", "padding", "dilation", "groups", "kernel_size", "in_channels", "out_channels", "padding_mode",
     "output_padding", "transposed", "in_features", "out_features"}
)  # fmt: skip
# Reads of a tensor that see only its metadata, never its values.
_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension"})
_CONV_FUNCTIONS: dict[type[nn.Module], tuple[Callable[..., Any], ...]] = {
    nn.Conv1d: (F.conv1d, torch.conv1d),
    nn.Conv2d: (F.conv2d, torch.conv2d),
    nn.Conv3d: (F.conv3d, torch.conv3d),
}
# Methods whose override would change what a conv computes from its weight (see matching._COMPUTING_METHODS).
_COMPUTING_METHODS = ("forward", "_conv_forward", "_output_padding", "__call__", "_call_impl", "__getattr__")
_MAX_DEPTH = 2


def padded_conv_family(module: nn.Module) -> type[nn.Module] | None:
    """The torch conv class when ``module`` is a subclass whose forward provably pads, then convolves; else ``None``.

    Proven from the source of the one ``forward`` the subclass defines: its last statement returns
    ``F.convNd(<input>, self.weight, self.bias, ...)``, ``super().forward(<input>)`` or
    ``self._conv_forward(<input>, self.weight, self.bias)`` (directly, or through a module-level function such as
    timm's ``conv2d_same`` that passes the weight and bias on the same way); before it, ``self.weight`` and
    ``self.bias`` are read only for their shape, ``self`` is never passed on, and nothing is written to ``self``.
    Sub-modules it calls (``self.static_padding``) must hold no tensors of their own.

    Example:
        >>> class Padded(nn.Conv2d):
        ...     def forward(self, x):
        ...         return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride)
        >>> padded_conv_family(Padded(2, 3, 3)) is nn.Conv2d, padded_conv_family(nn.Conv2d(2, 3, 3))
        (True, None)
    """
    proof = _class_proof(type(module))
    if proof is None:
        return None
    family, called = proof
    if not isinstance(module._parameters.get("weight"), torch.Tensor):
        return None
    for name in called:
        sub = module._modules.get(name)
        if sub is None or any(True for _ in sub.parameters()) or any(True for _ in sub.buffers()):
            return None
    return family


@functools.cache
def _class_proof(cls: type) -> tuple[type[nn.Module], frozenset[str]] | None:
    """``(family, names of self attributes called)`` when ``cls``'s forward pads then convolves, else ``None``."""
    family = next((f for f in _CONV_FUNCTIONS if issubclass(cls, f)), None)
    if family is None or cls is family or cls.__module__.startswith("torch."):
        return None
    extra = cls.__mro__[: cls.__mro__.index(family)]
    overrides = [(klass, name) for klass in extra for name in _COMPUTING_METHODS if name in vars(klass)]
    if [name for _, name in overrides] != ["forward"]:
        return None
    if any(name in vars(klass) for klass in extra for name in ("weight", "bias")):
        return None  # a property computing the weight (weight standardisation, a parametrization)
    forward = vars(overrides[0][0])["forward"]
    function = _parse(forward)
    if function is None:
        return None
    params = [a.arg for a in function.args.args]
    if len(params) != 2 or function.args.vararg or function.args.kwarg or function.args.kwonlyargs:
        return None
    roles = {"weight": _self_attr(params[0], "weight"), "bias": _self_attr(params[0], "bias")}
    checker = _Checker(cls, family, forward.__globals__, params[0], roles)
    return (family, frozenset(checker.called)) if checker.body_ok(function, 0) else None


def reads_only_settings(function: Callable[..., Any], parameter: str) -> bool:
    """Whether ``function`` reads its argument ``parameter`` only as ``parameter.<setting>`` (see :data:`SETTINGS`).

    Example:
        >>> def pad_for(x, conv):
        ...     return F.pad(x, [conv.kernel_size[0] // 2] * 4)
        >>> reads_only_settings(pad_for, "conv"), reads_only_settings(lambda x, conv: conv(x), "conv")
        (True, False)
    """
    tree = _parse(function)
    if tree is None:
        return False
    parents = _parents(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == parameter:
            if isinstance(node.ctx, ast.Store):
                return False
            parent = parents.get(id(node))
            if not (isinstance(parent, ast.Attribute) and parent.attr in SETTINGS):
                return False
            if isinstance(parents.get(id(parent)), ast.Call) and parents[id(parent)].func is parent:
                return False
    return True


@functools.cache
def parsed_source(function: Any) -> ast.Module | None:
    """The parsed source of ``function``, or ``None`` without source; read once per function (parsing is slow, and
    a model calls the same few methods at many places). The tree is shared: read it, never change it."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _parse(function: Any) -> ast.FunctionDef | None:
    tree = parsed_source(function)
    first = tree.body[0] if tree is not None and tree.body else None
    return first if isinstance(first, ast.FunctionDef) else None


def _parents(tree: ast.AST) -> dict[int, ast.AST]:
    return {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _self_attr(self_name: str, attr: str) -> str:
    return f"{self_name}.{attr}"


def _text(node: ast.AST) -> str:
    return ast.unparse(node)


class _Checker:
    """Checks one function body against the pad-then-convolve rule, with ``roles`` naming the weight and bias."""

    def __init__(self, cls: type, family: type, globals_: dict[str, Any], self_name: str | None, roles: dict[str, str]):
        self.cls = cls
        self.family = family
        self.globals = globals_
        self.self_name = self_name
        self.roles = roles
        self.called: set[str] = set()

    def body_ok(self, function: ast.FunctionDef, depth: int) -> bool:
        body = list(function.body)
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # docstring
        if not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
            return False
        result = body[-1].value
        before = body[:-1]
        if isinstance(result, ast.Name) and before and isinstance(before[-1], ast.Assign):
            # x = F.conv2d(...); return x
            assign = before[-1]
            target = assign.targets[0] if len(assign.targets) == 1 else None
            if isinstance(target, ast.Name) and target.id == result.id:
                result, before = assign.value, before[:-1]
        if not isinstance(result, ast.Call):
            return False
        protected = {*self.roles.values(), _root_name(result.func)}
        return all(self.statement_ok(s, protected) for s in before) and self.conv_call_ok(result, depth)

    def statement_ok(self, statement: ast.stmt, protected: set[str]) -> bool:
        """A statement before the convolution: no early exit, no writes to ``self`` or to the names the final
        call relies on, and every read of the weight or bias only a read of its shape."""
        for node in ast.walk(statement):
            if isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom, ast.Global, ast.Nonlocal, ast.Lambda)):
                return False
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                for target in targets:
                    for part in ast.walk(target):
                        if isinstance(part, ast.Name) and part.id in protected and isinstance(part.ctx, ast.Store):
                            return False
                        writes = isinstance(part, (ast.Attribute, ast.Subscript))
                        if writes and isinstance(part.ctx, (ast.Store, ast.Del)):
                            return False
            if isinstance(node, (ast.NamedExpr, ast.With, ast.AsyncWith)):
                return False
        return self.expression_ok(statement)

    def expression_ok(self, tree: ast.AST) -> bool:
        """``tree`` reads the weight and bias only for their metadata, and ``self`` only for settings or a call
        of a sub-module held in an instance attribute."""
        parents = _parents(tree)
        for node in ast.walk(tree):
            text = _text(node) if isinstance(node, (ast.Name, ast.Attribute)) else ""
            if text in self.roles.values():
                parent = parents.get(id(node))
                if isinstance(parent, ast.Attribute) and parent.attr in _METADATA_ATTRS:
                    continue
                if isinstance(parent, ast.Attribute) and parent.attr in _METADATA_METHODS:
                    grand = parents.get(id(parent))
                    if isinstance(grand, ast.Call) and grand.func is parent:
                        continue
                return False
            if self.self_name is None:
                continue
            if isinstance(node, ast.Name) and node.id == self.self_name:
                parent = parents.get(id(node))
                if not isinstance(parent, ast.Attribute):
                    return False  # self passed on, or used bare
                attr = parent.attr
                if attr in self.roles.values() or _self_attr(self.self_name, attr) in self.roles.values():
                    continue  # checked above
                if attr.startswith("_"):
                    return False
                grand = parents.get(id(parent))
                if isinstance(grand, ast.Call) and grand.func is parent:
                    if hasattr(self.cls, attr):
                        return False  # a method of the class: it could read anything
                    self.called.add(attr)
                    continue
                if attr not in SETTINGS and hasattr(self.cls, attr) and callable(getattr(self.cls, attr)):
                    return False
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "vars"):
                return False
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
                return False
        return True

    def conv_call_ok(self, call: ast.Call, depth: int) -> bool:
        """The final call: ``F.convNd(input, weight, bias, ...)``, the parent's forward, or a module-level function
        that itself passes the rule with its parameters standing for the weight and bias."""
        weight, bias = self.roles["weight"], self.roles["bias"]
        func = call.func
        if self.self_name is not None and isinstance(func, ast.Attribute):
            owner = func.value
            if (
                func.attr == "forward"
                and isinstance(owner, ast.Call)
                and _text(owner.func) == "super"
                and not owner.args
                and len(call.args) == 1
                and not call.keywords
            ):
                return self.expression_ok(call.args[0])
            if _text(owner) == self.self_name and func.attr == "_conv_forward":
                args = [_text(a) for a in call.args]
                return (
                    len(call.args) == 3
                    and not call.keywords
                    and args[1:] == [weight, bias]
                    and self.expression_ok(call.args[0])
                )
        target = _resolve(func, self.globals)
        if target is None:
            return False
        arguments = _bind(call, target)
        if arguments is None:
            return False
        if any(target is f for f in _CONV_FUNCTIONS[self.family]):
            if _text_or_none(arguments.get("weight")) != weight or _text_or_none(arguments.get("bias")) != bias:
                return False
            others = [v for k, v in arguments.items() if k not in ("weight", "bias")]
            return all(self.expression_ok(v) for v in others)
        if depth >= _MAX_DEPTH or not inspect.isfunction(target) or target.__module__.startswith("torch"):
            return False
        roles = {}
        for name, value in arguments.items():
            if _text(value) == weight:
                roles["weight"] = name
            elif _text(value) == bias:
                roles["bias"] = name
            elif not self.expression_ok(value):
                return False
        if set(roles) != {"weight", "bias"}:
            return False
        function = _parse(target)
        if function is None or function.args.vararg or function.args.kwarg:
            return False
        inner = _Checker(self.cls, self.family, target.__globals__, None, roles)
        return inner.body_ok(function, depth + 1)


def _root_name(node: ast.AST) -> str:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def _text_or_none(node: ast.AST | None) -> str | None:
    return None if node is None else _text(node)


def _resolve(func: ast.AST, globals_: dict[str, Any]) -> Any:
    """The object a dotted name (``F.conv2d``, ``conv2d_same``) names in ``globals_``, else ``None``."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name) or func.id not in globals_:
        return None
    value = globals_[func.id]
    for part in reversed(parts):
        if not inspect.ismodule(value) and not inspect.isclass(value):
            return None
        value = getattr(value, part, None)
    return value


def _bind(call: ast.Call, target: Any) -> dict[str, ast.AST] | None:
    """Map the call's argument expressions onto ``target``'s parameter names (``None`` when it cannot be done)."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    names: list[str]
    if any(target is f for fs in _CONV_FUNCTIONS.values() for f in fs):
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    else:
        try:
            names = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            return None
    if len(call.args) > len(names):
        return None
    bound = dict(zip(names, call.args))
    for keyword in call.keywords:
        if keyword.arg in bound or keyword.arg not in names:
            return None
        bound[keyword.arg] = keyword.value
    return bound


# Code that reaches children without naming them: any of these in a class's source and no pair is proven.
_GENERIC_ACCESS = frozenset(
    {"children", "named_children", "modules", "named_modules", "_modules", "__dict__", "apply", "getattr", "vars",
     "parameters", "named_parameters", "state_dict", "get_submodule"}
)  # fmt: skip


@functools.cache
def chained_children(cls: type) -> tuple[tuple[str, str], ...]:
    """Pairs ``(first, second)`` of attributes that ``cls``'s code uses once each, only as ``second(first(x))``.

    Proven from source: ``forward`` and the methods of the class it calls (what a call of the module runs) reach
    no child without naming it (``self.children()``, ``getattr``); in every method of every class of the MRO
    above torch's own (``__init__`` aside) each attribute is loaded once, so no other method calls the layer
    alone; both calls take one positional argument, and either the calls nest
    (``self.bn(self.conv(x))``) or two consecutive statements rebind one name (``h = self.conv(h)`` then
    ``h = self.bn(h)``). The first call's output then reaches the second call and nothing else, so a BatchNorm
    ``second`` can fold into a layer ``first`` even where the forward around them cannot be traced.

    Example:
        >>> class Head(nn.Module):
        ...     def forward(self, x, flag=False):
        ...         x = self.conv(x)
        ...         x = self.bn(x)
        ...         return x if flag else x.relu()
        >>> chained_children(Head)
        (('conv', 'bn'),)
    """
    methods = _forward_methods(cls)
    every = _all_methods(cls)
    if not methods or every is None:
        return ()
    for method in methods:
        me = method.args.args[0].arg
        parents = _parents(method)
        for node in ast.walk(method):
            if isinstance(node, ast.Name) and node.id == me and not isinstance(parents.get(id(node)), ast.Attribute):
                return ()  # `self` passed on: the callee may reach any child
            if isinstance(node, ast.Name) and node.id in _GENERIC_ACCESS:
                return ()
            if isinstance(node, ast.Attribute) and node.attr in _GENERIC_ACCESS:
                return ()
    loads: dict[str, list[ast.Attribute]] = {}
    for method in every:
        if not method.args.args:
            continue
        me = method.args.args[0].arg
        for node in ast.walk(method):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me:
                loads.setdefault(node.attr, []).append(node)
    forward_loads = {id(n) for m in methods for n in ast.walk(m)}
    once = {name: nodes[0] for name, nodes in loads.items() if len(nodes) == 1 and id(nodes[0]) in forward_loads}
    pairs: list[tuple[str, str]] = []
    for method in methods:
        parents = _parents(method)
        for name, attr in once.items():
            call = parents.get(id(attr))
            if not _single_argument_call(call, attr):
                continue
            assert isinstance(call, ast.Call)
            outer = parents.get(id(call))
            inner = call.args[0]
            # self.second(self.first(x))
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute):
                first = inner.func.attr
                if once.get(first) is inner.func and _single_argument_call(inner, inner.func) and first != name:
                    pairs.append((first, name))
                continue
            # h = self.first(h0) directly before h = self.second(h)
            if not (isinstance(inner, ast.Name) and isinstance(outer, ast.Assign) and _rebinds(outer, inner.id)):
                continue
            block = _block_of(parents, outer)
            index = next((i for i, s in enumerate(block) if s is outer), 0)
            previous = block[index - 1] if index > 0 else None
            if not (isinstance(previous, ast.Assign) and _rebinds(previous, inner.id)):
                continue
            before = previous.value
            if isinstance(before, ast.Call) and isinstance(before.func, ast.Attribute):
                first = before.func.attr
                if once.get(first) is before.func and _single_argument_call(before, before.func) and first != name:
                    pairs.append((first, name))
    return tuple(pairs)


def _forward_methods(cls: type) -> list[ast.FunctionDef]:
    """The parsed ``forward`` of ``cls`` and every method of ``cls`` it calls, transitively (``[]`` when a
    source cannot be read)."""
    todo, seen, found = ["forward"], set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        function = inspect.getattr_static(cls, name, None)
        function = getattr(function, "__func__", function)  # staticmethod, classmethod
        if not inspect.isfunction(function):
            if name == "forward" or callable(function):
                return []
            continue
        if function.__module__.startswith("torch."):
            continue
        parsed = _parse(function)
        if parsed is None or not parsed.args.args:
            return []
        found.append(parsed)
        me = parsed.args.args[0].arg
        for node in ast.walk(parsed):
            on_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me
            if on_self and hasattr(cls, node.attr):
                todo.append(node.attr)
    return found


def _all_methods(cls: type) -> list[ast.FunctionDef] | None:
    """Every method (and property getter) the classes of ``cls``'s MRO above torch's own define, ``__init__``
    aside, parsed one by one, with the same objects :func:`_forward_methods` parsed; ``None`` when a source
    cannot be read."""
    by_function: dict[Any, ast.FunctionDef] = {}
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch."):
            continue
        for name, value in vars(klass).items():
            function = getattr(value, "fget", None) or getattr(value, "__func__", value)
            if name == "__init__" or not inspect.isfunction(function) or function in by_function:
                continue
            parsed = _parse(function)
            if parsed is None:
                return None
            by_function[function] = parsed
    return list(by_function.values())


def _single_argument_call(call: ast.AST | None, func: ast.AST) -> bool:
    return (
        isinstance(call, ast.Call)
        and call.func is func
        and len(call.args) == 1
        and not call.keywords
        and not isinstance(call.args[0], ast.Starred)
    )


def _rebinds(assign: ast.Assign, name: str) -> bool:
    return len(assign.targets) == 1 and isinstance(assign.targets[0], ast.Name) and assign.targets[0].id == name


def _block_of(parents: dict[int, ast.AST], statement: ast.stmt) -> list[ast.stmt]:
    """The statement list that holds ``statement`` (a function body, an ``if`` branch, a loop body)."""
    owner = parents.get(id(statement))
    for field in ("body", "orelse", "finalbody", "handlers"):
        block = getattr(owner, field, None)
        if isinstance(block, list) and any(s is statement for s in block):
            return block
    return []

"""Merge parallel branches summed after one input (RepVGG, MobileOne, ACNet style) into a single convolution.

A sum such as ``conv3x3(x) + conv1x1(x) + bn(x)`` is, at inference, one convolution: every branch is a
convolution of the same ``x`` with the same stride, dilation and groups, and smaller kernels are larger
kernels padded with zeros. The identity ``x``, an inference BatchNorm of ``x`` and an average pool of ``x``
are convolutions too (a one-hot, a scaled one-hot and a constant kernel). BatchNorms after the branch
convolutions are folded first by ``fold_bn_into_preceding``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn
from torch.nn.parameter import is_lazy

from fx_lightning.fusion.maths import (
    all_finite,
    average_kernel,
    cast_like,
    identity_kernel,
    padding_for_offset,
    pool_divisor,
    scale_output_channels,
    sum_branches,
    window_offset,
)
from fx_lightning.fusion.passes.matching import (
    IN_PLACE_ARITHMETIC,
    arithmetic_operands,
    conv_padding,
    has_hooks,
    is_number,
    match_batch_norm,
    producer_layer,
    tensor_rank,
    value_users,
    written_between,
)
from fx_lightning.fusion.passes.rewriting import (
    PassChanges,
    Rewrite,
    copy_scope,
    install_for_node,
    scope_of,
    with_new_params,
)
from fx_lightning.fusion.report import Folded, Merged

RULE = "merge_branches"

_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass(frozen=True)
class _Geometry:
    """Where a branch reads its input: equal geometries read the same windows, so their kernels add up."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    # maths.window_offset: equal values give equal output sizes for every input size.
    offset: tuple[int, ...]
    parity: tuple[int, ...]


@dataclass
class _Branch:
    """One summand of a sum, recognised as a convolution of ``input``."""

    kind: str  # "conv", "identity", "batch_norm", "pool"
    coefficient: float
    input: fx.Node
    name: str
    consumed: list[fx.Node] = field(default_factory=list)
    module: nn.Module | None = None
    geometry: _Geometry | None = None
    kernel_size: tuple[int, ...] = ()
    channels: int = -1
    scale_shift: tuple[Tensor, Tensor] | None = None
    pool: nn.Module | None = None
    bn_name: str = ""


@dataclass
class _Group:
    """Branches that merge into one convolution: same input and layer settings, compatible kernels."""

    convs: list[_Branch]
    others: list[_Branch] = field(default_factory=list)
    constant: float = 0.0

    @property
    def template(self) -> nn.Module:
        """The convolution with the largest kernel: the merged layer takes its settings and its name."""
        return self.largest.module

    @property
    def largest(self) -> _Branch:
        return max(self.convs, key=lambda b: math.prod(b.kernel_size))


def merge_branches(gm: fx.GraphModule) -> PassChanges:
    """Replace every sum of convolution branches of one input by a single convolution, where that is exact.

    Branches merge when they are convolutions (``Conv1d/2d/3d`` with torch's own forward, BatchNorm already
    folded) of the *same* input node with the same stride, dilation, groups, channels and zero padding, and
    kernels that pad with zeros to the largest one with matching padding. With ``in_channels ==
    out_channels``, the input itself, an inference BatchNorm of it and an average pool of it (exact only with
    ``count_include_pad=True`` or no padding, no ``ceil_mode``) merge too. Each branch output must be read by
    the sum alone. Other summands stay and are added to the merged convolution.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        :class:`PassChanges` with one :class:`Rewrite` per sum, holding one :class:`Merged` per new convolution
        and one :class:`Folded` per BatchNorm it absorbed.
    """
    result = PassChanges()
    visited: set[fx.Node] = set()
    for root in reversed(list(gm.graph.nodes)):
        if root in visited or getattr(root, "_erased", False) or _sum_operands(root) is None:
            continue
        inner: list[fx.Node] = []
        leaves: list[tuple[Any, float]] = []
        _expand(root, 1.0, inner, leaves)
        visited.update(inner)
        if any(_mutates_visible(gm, node) for node in (root, *inner)):
            continue
        _merge_sum(gm, root, inner, leaves, result)
    return result


def _sum_operands(node: fx.Node) -> list[tuple[Any, float]] | None:
    """``[(a, 1), (b, ±alpha)]`` when ``node`` computes ``a ± alpha * b`` of two values, at least one a node."""
    operands = arithmetic_operands(node)
    if operands is None or operands[0] not in ("add", "sub"):
        return None
    op, first, second, alpha = operands
    if not isinstance(first, fx.Node) and not isinstance(second, fx.Node):
        return None
    return [(first, 1.0), (second, (1.0 if op == "add" else -1.0) * alpha)]


def _expand(node: fx.Node, coefficient: float, inner: list[fx.Node], leaves: list[tuple[Any, float]]) -> None:
    """Flatten a tree of sums read only by each other into ``(summand, coefficient)`` leaves."""
    for operand, sign in _sum_operands(node) or []:
        if isinstance(operand, fx.Node) and _sum_operands(operand) is not None and list(operand.users) == [node]:
            inner.append(operand)
            _expand(operand, coefficient * sign, inner, leaves)
        else:
            leaves.append((operand, coefficient * sign))


def _mutates_visible(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes in place into a tensor that something besides the sum could see.

    Rewriting the sum out of place is only safe when the overwritten tensor is a fresh layer output or
    sum read by nothing else; a placeholder, a buffer or a view of either would lose the write.
    """
    if node.target not in IN_PLACE_ARITHMETIC:
        return False
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or value_users(first) != [node]:  # shape checks see no write
        return True
    return _sum_operands(first) is None and producer_layer(gm, first) is None


def _merge_sum(
    gm: fx.GraphModule, root: fx.Node, inner: list[fx.Node], leaves: list[tuple[Any, float]], result: PassChanges
) -> None:
    branches: list[_Branch] = []
    rest: list[tuple[Any, float]] = []
    constant = 0.0
    for leaf, coefficient in leaves:
        if is_number(leaf):
            constant += coefficient * float(leaf)
        elif isinstance(leaf, fx.Node):
            branches.append(_branch(gm, leaf, coefficient, {root, *inner}))
        else:
            return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = [g for g in _group(gm, branches) if not _input_written(gm, g, root, order)]
    if not groups:
        return
    merged_ids = {id(b) for g in groups for b in (*g.convs, *g.others)}
    rest += [(_branch_value(b), b.coefficient) for b in branches if id(b) not in merged_ids]
    if any(abs(c) != 1.0 for _, c in rest):
        return  # a weighted leftover (torch.add alpha) would need re-expressing; leave such sums alone
    groups[0].constant = constant
    modules = [_merged_conv(group) for group in groups]
    if not all(all_finite(m.weight, m.bias) for m in modules):
        return  # the merged weights overflow the layer's dtype: keep the branches
    _rewrite(gm, root, inner, list(zip(groups, modules)), rest, result)


def _input_written(gm: fx.GraphModule, group: _Group, root: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether something writes into the group's input between its first branch's read and the sum.

    The merged convolution reads the input once, where the first branch did; a later branch (or the identity
    term, read at the sum) reading it after an in-place write (``h.relu_()``) saw another value.
    """
    first = min((n for b in (*group.convs, *group.others) for n in b.consumed), key=order.__getitem__)
    return written_between(gm, group.convs[0].input, first, root) is not None


def _branch_value(branch: _Branch) -> fx.Node:
    """The node whose value the sum reads for ``branch`` (kept when the branch does not merge)."""
    return branch.input if branch.kind == "identity" else branch.consumed[0]


def _branch(gm: fx.GraphModule, leaf: fx.Node, coefficient: float, sums: set[fx.Node]) -> _Branch:
    """Recognise a summand as a convolution, BatchNorm or average pool of some input, else as that input itself."""
    # Readers of the branch's shape only (timm's `_assert(x.ndim == 4)`) are moved to the merged conv.
    readers = value_users(leaf)
    only_summed = len(readers) == 1 and set(readers) <= sums
    conv = _conv_module(gm, leaf) if only_summed else None
    geometry = _conv_geometry(conv) if conv is not None else None
    if conv is not None and geometry is not None:
        return _Branch(
            "conv",
            coefficient,
            leaf.args[0],
            str(leaf.target),
            [leaf],
            conv,
            geometry,
            tuple(conv.kernel_size),
            conv.out_channels,
        )
    bn = match_batch_norm(gm, leaf) if only_summed else None
    if bn is not None and bn.stats is not None and bn.input is not None:
        branch = _Branch("batch_norm", coefficient, bn.input, bn.name, [leaf], channels=bn.num_features)
        branch.scale_shift = bn.stats.scale_shift()
        branch.bn_name = bn.name
        pooled = _pool_branch(gm, bn.input, coefficient, {leaf})
        if pooled is not None:
            branch.input, branch.pool, branch.geometry = pooled.input, pooled.pool, pooled.geometry
            branch.kernel_size = pooled.kernel_size
            branch.consumed.append(bn.input)
            branch.name = f"{pooled.name} -> {bn.name}"
        return branch
    pooled = _pool_branch(gm, leaf, coefficient, sums) if only_summed else None
    if pooled is not None:
        return pooled
    return _Branch("identity", coefficient, leaf, f"identity({leaf.name})")


def _conv_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    layer = producer_layer(gm, node)
    if not isinstance(layer, nn.modules.conv._ConvNd) or isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return None
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    if is_lazy(layer.weight) or has_hooks(layer) or layer.padding_mode != "zeros":
        return None
    return layer


def _conv_geometry(conv: nn.Module) -> _Geometry | None:
    padding = conv_padding(conv)
    if padding is None:
        return None
    return _geometry(tuple(conv.kernel_size), tuple(conv.stride), padding, tuple(conv.dilation))


def _geometry(
    kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> _Geometry:
    offset = window_offset(kernel, padding, dilation)
    return _Geometry(tuple(stride), tuple(dilation), offset, tuple(k % 2 for k in kernel))


def _pool_branch(gm: fx.GraphModule, node: fx.Node, coefficient: float, sums: set[fx.Node]) -> _Branch | None:
    """Recognise ``node`` as an exact average pool of an input node read only by ``sums``."""
    readers = value_users(node)
    if node.op != "call_module" or set(readers) - sums or len(readers) != 1:
        return None
    pool = gm.get_submodule(str(node.target))
    cls = type(pool)
    family = next((f for f in _AVG_POOLS if issubclass(cls, f) and cls.forward is f.forward), None)
    if family is None or has_hooks(pool) or len(node.args) != 1 or node.kwargs or pool.ceil_mode:
        return None
    dims = _AVG_POOLS.index(family) + 1
    kernel = _tuple(pool.kernel_size, dims)
    stride = _tuple(pool.stride or pool.kernel_size, dims)
    padding = _tuple(pool.padding, dims)
    if any(padding) and not pool.count_include_pad:
        return None
    if not isinstance(node.args[0], fx.Node):
        return None
    geometry = _geometry(kernel, stride, padding, (1,) * dims)
    return _Branch(
        "pool", coefficient, node.args[0], str(node.target), [node], geometry=geometry, kernel_size=kernel, pool=pool
    )


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _group(gm: fx.GraphModule, branches: list[_Branch]) -> list[_Group]:
    """Partition the convolution branches into mergeable groups and attach the other branches they accept."""
    groups: dict[tuple[Any, ...], _Group] = {}
    for branch in branches:
        if branch.kind != "conv":
            continue
        conv = branch.module
        key = (
            branch.input,
            branch.geometry,
            conv.groups,
            conv.in_channels,
            conv.out_channels,
            conv.weight.dtype,
            conv.weight.device,
            conv.weight.dim(),
        )
        groups.setdefault(key, _Group([])).convs.append(branch)
    for branch in branches:
        if branch.kind == "conv":
            continue
        for key, group in groups.items():
            if _accepts(gm, key, group, branch):
                group.others.append(branch)
                break
    return [g for g in groups.values() if len(g.convs) + len(g.others) >= 2]


def _accepts(gm: fx.GraphModule, key: tuple[Any, ...], group: _Group, branch: _Branch) -> bool:
    conv = group.template
    geometry: _Geometry = key[1]
    dims = conv.weight.dim() - 2
    if branch.input is not key[0] or conv.in_channels != conv.out_channels:
        return False
    if branch.kind == "batch_norm":
        rank = tensor_rank(gm, branch.input)
        if branch.channels != conv.out_channels or rank not in (None, conv.weight.dim()):
            return False
    if branch.pool is not None:
        pool_dims = _AVG_POOLS.index(next(f for f in _AVG_POOLS if isinstance(branch.pool, f))) + 1
        return pool_dims == dims and branch.geometry == geometry and all(d == 1 for d in geometry.dilation)
    identity = _geometry((1,) * dims, (1,) * dims, (0,) * dims, geometry.dilation)
    return geometry == identity


def _rewrite(
    gm: fx.GraphModule,
    root: fx.Node,
    inner: list[fx.Node],
    groups: list[tuple[_Group, nn.Module]],
    rest: list[tuple[Any, float]],
    result: PassChanges,
) -> None:
    graph = gm.graph
    touched = [root, *inner, *(n for group, _ in groups for b in (*group.convs, *group.others) for n in b.consumed)]
    rewrite = Rewrite(RULE, [], scope=scope_of(touched))
    built: list[tuple[fx.Node, nn.Module, _Group]] = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for group, module in groups:
        consumed = [n for b in (*group.convs, *group.others) for n in b.consumed]
        conv_node = group.largest.consumed[0]
        # Placed before the first branch it replaces, so that readers of a branch's shape can read it instead.
        with graph.inserting_before(min(consumed, key=order.__getitem__)):
            node = graph.call_module(str(conv_node.target), (conv_node.args[0],))
        copy_scope(node, conv_node)
        if "tensor_meta" in conv_node.meta:  # same output shape: keep shape facts for later passes
            node.meta["tensor_meta"] = conv_node.meta["tensor_meta"]
        for branch_node in consumed:
            values = value_users(branch_node)
            for reader in [u for u in branch_node.users if u not in values]:
                reader.replace_input_with(branch_node, node)
        built.append((node, module, group))
    with graph.inserting_before(root):
        value: Any = None
        for node, _, _ in built:
            value = node if value is None else graph.call_function(operator.add, (value, node))
            copy_scope(value, root)
        for leaf, coefficient in rest:
            value = graph.call_function(operator.add if coefficient > 0 else operator.sub, (value, leaf))
            copy_scope(value, root)
    if "tensor_meta" in root.meta:
        value.meta["tensor_meta"] = root.meta["tensor_meta"]
    root.replace_all_uses_with(value)
    dead = {root, *inner} | {n for _, _, g in built for b in (*g.convs, *g.others) for n in b.consumed}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(dead, key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
    for node, module, group in built:
        target = install_for_node(gm, node, module)
        branches = (*group.convs, *group.others)
        names = tuple(_describe(b) for b in branches)
        if group.constant:
            names += (f"constant {group.constant:g}",)
        rewrite.records.append(Merged(target, names, RULE))
        folds = [Folded(b.bn_name, target, RULE, layers=(target,)) for b in branches if b.kind == "batch_norm"]
        rewrite.records += folds
    result.rewrites.append(rewrite)


def _describe(branch: _Branch) -> str:
    sign = "" if branch.coefficient == 1.0 else f"{branch.coefficient:g} * "
    return f"{sign}{branch.name}"


def _merged_conv(group: _Group) -> nn.Module:
    """A new convolution computing the sum of ``group``'s branches, built in float64 and cast back."""
    template = group.template
    dims = template.weight.dim() - 2
    kernel_size = tuple(
        max(b.kernel_size[i] if b.kernel_size else 1 for b in (*group.convs, *group.others)) for i in range(dims)
    )
    geometry = group.convs[0].geometry
    padding = padding_for_offset(geometry.offset, kernel_size, geometry.dilation)
    terms: list[tuple[float, Tensor, Tensor | None]] = []
    device = template.weight.device
    for branch in group.convs:
        terms.append((branch.coefficient, branch.module.weight, branch.module.bias))
    for branch in group.others:
        channels, groups = template.out_channels, template.groups
        if branch.pool is not None:
            divisor = pool_divisor(branch.kernel_size, getattr(branch.pool, "divisor_override", None))
            kernel = average_kernel(channels, groups, branch.kernel_size, divisor, device)
        else:
            kernel = identity_kernel(channels, groups, dims, device)
        bias = None
        if branch.scale_shift is not None:
            scale, shift = branch.scale_shift
            kernel, bias = scale_output_channels(kernel, scale), shift
        terms.append((branch.coefficient, kernel, bias))
    weight, bias = sum_branches(terms, kernel_size, group.constant)
    like_bias = template.bias if template.bias is not None else template.weight.new_zeros(template.out_channels)
    module = with_new_params(template, cast_like(weight, template.weight), cast_like(bias, like_bias))
    module.kernel_size = kernel_size
    module.padding = padding
    module._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]
    return module

"""Fold a BatchNorm into the convolution or linear layer that reads its output, where that is exact."""

from __future__ import annotations

from torch import fx, nn

from fx_lightning.fusion.maths import fold_bn_before_conv, fold_bn_before_linear
from fx_lightning.fusion.passes.matching import (
    BatchNormCall,
    conv_padding,
    describe,
    foldable_batch_norms,
    has_hooks,
    is_transposed,
    producer_layer,
    tensor_rank,
    value_users,
    written_between,
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

RULE = "fold_bn_into_following"


def fold_bn_into_following(gm: fx.GraphModule) -> PassChanges:
    """Fold every inference BatchNorm whose only reader is an unpadded convolution or a 2-D linear layer.

    ``conv(BN(x))`` equals one convolution only when the convolution pads nothing: padding would
    insert zeros where BN would have produced its shift. The layer then reads ``x`` where it read ``BN(x)``,
    so nothing between the two calls may write into ``x``.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        :class:`PassChanges` with one :class:`Rewrite` per fold and a reason for every BatchNorm left.
    """
    result = PassChanges()
    for bn in foldable_batch_norms(gm, result.reasons):
        why, consumer = _why_not(gm, bn)
        if why:
            result.reasons[bn.node.name] = why
            continue
        assert bn.input is not None
        assert bn.stats is not None
        path = str(consumer.target)
        layer = gm.get_submodule(path)
        if isinstance(layer, nn.Linear):
            folded = fold_bn_before_linear(layer.weight, layer.bias, bn.stats)
        else:
            folded = fold_bn_before_conv(layer.weight, layer.bias, bn.stats, groups=layer.groups)
        rewrite = Rewrite(RULE, [], scope=scope_of([bn.node, consumer]), seen={path: layer})
        target = install_for_node(gm, consumer, with_new_params(layer, *folded))
        if target == path and bn.module is not None and bn.input not in bn.node.meta.get("bypassed", ()):
            rewrite.swaps = {path: gm.get_submodule(target), str(bn.node.target): PASS_THROUGH}
        replace_with_input(bn.node, bn.input)
        rewrite.records.append(Folded(bn.name, target, RULE, layers=(target,)))
        result.rewrites.append(rewrite)
    return result


def _why_not(gm: fx.GraphModule, bn: BatchNormCall) -> tuple[str, fx.Node]:
    node = bn.node
    users = value_users(node)
    if len(users) != 1 or bn.input is None:
        return f"its output is read by {len(users)} nodes, not by one layer", node
    consumer = users[0]
    layer = producer_layer(gm, consumer)
    if layer is None or is_transposed(layer):
        return f"the layer after it is not a Conv/Linear call ({describe(consumer)})", node
    if consumer.args[:1] != (node,) or len(consumer.args) != 1 or consumer.kwargs:
        return f"'{consumer.target}' is called with other arguments too", node
    if has_hooks(layer):
        return f"the following layer '{consumer.target}' has forward hooks", node
    in_features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if in_features != bn.num_features:
        return f"it normalises {bn.num_features} features but '{consumer.target}' reads {in_features}", node
    rank = bn.rank or tensor_rank(gm, node)
    if isinstance(layer, nn.Linear):
        if rank != 2:
            return f"the Linear '{consumer.target}' after it may not see 2-D input", node
    elif not _pads_nothing(layer):
        return f"the convolution '{consumer.target}' after it pads its input (padding={layer.padding})", node
    elif rank != layer.weight.dim():
        seen = "unknown" if rank is None else f"{rank}-D"
        return f"the convolution '{consumer.target}' after it may run on unbatched input (rank {seen})", node
    writer = written_between(gm, bn.input, node, consumer)
    if writer is not None:
        return f"'{writer.name}' writes into its input before '{consumer.target}' would read it", node
    return "", consumer


def _pads_nothing(conv: nn.Module) -> bool:
    padding = conv_padding(conv)
    return padding is not None and not any(padding)

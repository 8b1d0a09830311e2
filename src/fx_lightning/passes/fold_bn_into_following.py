"""Fold a BatchNorm into the convolution or linear layer that reads its output, where that is exact."""

from __future__ import annotations

from torch import fx, nn

from fx_lightning.folding import fold_bn_before_conv, fold_bn_before_linear
from fx_lightning.passes.common import (
    BatchNormCall,
    PassResult,
    conv_padding,
    describe,
    fold_into_layer,
    foldable_batch_norms,
    has_hooks,
    tensor_rank,
    value_users,
)
from fx_lightning.passes.fold_bn_into_preceding import producer_layer

RULE = "fold_bn_into_following"


def fold_bn_into_following(gm: fx.GraphModule) -> PassResult:
    """Fold every inference BatchNorm whose only reader is an unpadded convolution or a 2-D linear layer.

    ``conv(BN(x))`` equals one convolution only when the convolution pads nothing: padding would
    insert zeros where BN would have produced its shift.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        A :class:`PassResult` with one :class:`Folded` per fold and a reason for every BatchNorm left.
    """
    result = PassResult()
    for bn in foldable_batch_norms(gm, result):
        why, consumer = _why_not(gm, bn)
        if why:
            result.reasons[bn.node.name] = why
            continue
        layer = gm.get_submodule(consumer.target)
        if isinstance(layer, nn.Linear):
            folded = fold_bn_before_linear(layer.weight, layer.bias, bn.stats)
        else:
            folded = fold_bn_before_conv(layer.weight, layer.bias, bn.stats, groups=layer.groups)
        fold_into_layer(gm, bn, consumer, folded, RULE, result)
    return result


def _why_not(gm: fx.GraphModule, bn: BatchNormCall) -> tuple[str, fx.Node]:
    node = bn.node
    users = value_users(node)
    if len(users) != 1 or bn.input is None:
        return f"its output is read by {len(users)} nodes, not by one layer", node
    consumer = users[0]
    layer = producer_layer(gm, consumer)
    if layer is None or isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return f"the layer after it is not a Conv/Linear call ({describe(consumer)})", node
    if consumer.args[:1] != (node,) or len(consumer.args) != 1 or consumer.kwargs:
        return f"'{consumer.target}' is called with other arguments too", node
    if has_hooks(layer):
        return f"the following layer '{consumer.target}' has forward hooks", node
    in_features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if in_features != bn.num_features:
        return f"it normalises {bn.num_features} features but '{consumer.target}' reads {in_features}", node
    if isinstance(layer, nn.Linear):
        if tensor_rank(gm, node) != 2:
            return f"the Linear '{consumer.target}' after it may not see 2-D input", node
    elif not _pads_nothing(layer):
        return f"the convolution '{consumer.target}' after it pads its input (padding={layer.padding})", node
    elif tensor_rank(gm, node) not in (None, layer.weight.dim()):
        return f"the convolution '{consumer.target}' after it runs on unbatched input", node
    return "", consumer


def _pads_nothing(conv: nn.Module) -> bool:
    padding = conv_padding(conv)
    return padding is not None and not any(padding)

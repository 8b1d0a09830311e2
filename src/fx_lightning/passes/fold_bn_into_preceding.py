"""Fold a BatchNorm into the convolution, transposed convolution or linear layer that produces its input."""

from __future__ import annotations

from torch import fx, nn
from torch.nn.parameter import is_lazy

from fx_lightning.folding import fold_bn_after_conv, fold_bn_after_linear
from fx_lightning.passes.common import (
    BatchNormCall,
    PassResult,
    base_class,
    describe,
    fold_into_layer,
    foldable_batch_norms,
    has_hooks,
    tensor_rank,
    users_text,
    value_users,
)

RULE = "fold_bn_into_preceding"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def producer_layer(gm: fx.GraphModule, node: fx.Node | None) -> nn.Module | None:
    """The conv/conv-transpose/linear module ``node`` calls with torch's own forward, else ``None``."""
    if node is None or node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    cls = base_class(module)
    for family in (*_CONV, *_CONV_T, nn.Linear):
        if issubclass(cls, family) and cls.forward is family.forward:
            return module
    return None


def fold_bn_into_preceding(gm: fx.GraphModule) -> PassResult:
    """Fold every inference BatchNorm whose input is the sole output of a conv/conv-transpose/linear call.

    The folded layer gets new weight and bias tensors; a layer called at several sites gets a new
    sibling module for the folded site, so the other sites keep computing what they did.

    Args:
        gm: the graph module to rewrite in place.

    Returns:
        A :class:`PassResult` with one :class:`Folded` per fold and a reason for every BatchNorm left.
    """
    result = PassResult()
    for bn in foldable_batch_norms(gm, result):
        layer = producer_layer(gm, bn.input)
        why = _why_not(gm, bn, layer)
        if why:
            result.reasons[bn.node.name] = why
            continue
        assert bn.input is not None
        assert layer is not None
        if isinstance(layer, nn.Linear):
            folded = fold_bn_after_linear(layer.weight, layer.bias, bn.stats)
        else:
            transposed = isinstance(layer, _CONV_T)
            folded = fold_bn_after_conv(layer.weight, layer.bias, bn.stats, transposed=transposed, groups=layer.groups)
        fold_into_layer(gm, bn, bn.input, folded, RULE, result)
    return result


def _why_not(gm: fx.GraphModule, bn: BatchNormCall, layer: nn.Module | None) -> str:
    source = bn.input
    if layer is None or source is None:
        what = describe(source) if source is not None else "a non-tensor argument"
        return f"its input is not a Conv/ConvTranspose/Linear layer call ({what})"
    if is_lazy(layer.weight):
        return f"the preceding layer '{source.target}' is lazy and not materialised yet"
    if len(value_users(source)) > 1:
        return f"the output of '{source.target}' is also read by {users_text(source, besides=bn.node)}"
    if has_hooks(layer):
        return f"the preceding layer '{source.target}' has forward hooks, which would see folded outputs"
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out_features:
        return f"it normalises {bn.num_features} features but '{source.target}' produces {out_features}"
    rank = tensor_rank(gm, source)
    if isinstance(layer, nn.Linear):
        if rank != 2:
            shown = "unknown" if rank is None else f"{rank}-D"
            return (
                f"'{source.target}' output rank is {shown}: BatchNorm normalises dim 1, which is the Linear's "
                "features only for 2-D input (pass example_inputs to fuse() if it is 2-D)"
            )
    elif rank is not None and rank != layer.weight.dim():
        return f"'{source.target}' runs on unbatched input ({rank}-D output), where BatchNorm dim 1 is not channels"
    return ""

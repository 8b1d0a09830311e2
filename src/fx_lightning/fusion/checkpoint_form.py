"""The checkpoint form of a fused network: the original architecture's state dict, with folded values.

A fold written at the user's own module paths (:attr:`fx_lightning.Folded.in_place`) can be expressed in the
original layout: the layer takes its folded weight, and the BatchNorm becomes an identity that carries the folded
bias (weight 1, ``running_mean`` 0, ``running_var`` ``1 - eps``, so that ``sqrt(var + eps) == 1``). Every other
fold (into generated code, into a functional call, merged branches, a layer folded at one of several call sites)
keeps the original values for its layers and BatchNorms, which compute the same in eval. Either way a fresh
instance of the user's class loads the result strictly and computes what the fused network computes.

Nothing here imports Lightning.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fx_lightning.fusion.report import Folded

_PRECEDING = "fold_bn_into_preceding"
_FOLLOWING = "fold_bn_into_following"


@dataclass(frozen=True)
class CheckpointFold:
    """How one folded BatchNorm appears in the checkpoint form.

    Attributes:
        bn: qualified name of the BatchNorm (or of the module calling it).
        layers: the layers it was folded into.
        written: whether the folded values are in the checkpoint form; otherwise the original values are.
        reason: why they could not be written, when not ``written``.
    """

    bn: str
    layers: tuple[str, ...]
    written: bool
    reason: str = ""


def checkpoint_plan(original: nn.Module, fused: nn.Module) -> list[CheckpointFold]:
    """Which folds of ``fused`` :func:`checkpoint_state_dict` writes in ``original``'s layout, and why not the rest.

    Args:
        original: the network before fusion.
        fused: the result of :func:`fx_lightning.fuse` on ``original`` (it carries ``fusion_report``).

    Returns:
        One :class:`CheckpointFold` per folded BatchNorm, in the report's order.

    Raises:
        TypeError: if an argument is not a module, or ``fused`` has no fusion report.
    """
    report = _report_of(original, fused, "checkpoint_plan")
    state = original.state_dict(keep_vars=True)
    return [_plan_one(record, original, fused, state, _tied(state)) for record in report.folded]


def checkpoint_state_dict(original: nn.Module, fused: nn.Module) -> dict[str, Tensor]:
    """A state dict for ``original``'s architecture that computes what ``fused`` computes (in eval mode).

    The folds listed as written by :func:`checkpoint_plan` carry their folded values; everything else keeps the
    original's values.

    Args:
        original: the network before fusion (its current values are the starting point).
        fused: the result of :func:`fx_lightning.fuse` on ``original`` (it carries ``fusion_report``).

    Returns:
        Exactly the keys, shapes, dtypes and devices of ``original.state_dict()``, as detached tensor copies
        (no ``Parameter`` objects, nothing shared with either network).

    Raises:
        TypeError: if an argument is not a module, or ``fused`` has no fusion report.

    Example:
        >>> from fx_lightning import fuse
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2)).eval()
        >>> state = checkpoint_state_dict(net, fuse(net))
        >>> sorted(state) == sorted(net.state_dict()), state["1.weight"].tolist(), state["1.running_mean"].tolist()
        (True, [1.0, 1.0], [0.0, 0.0])
    """
    report = _report_of(original, fused, "checkpoint_state_dict")
    live = original.state_dict(keep_vars=True)
    plans = [_plan_one(record, original, fused, live, _tied(live)) for record in report.folded]
    state = {k: v.detach().clone() for k, v in live.items()}
    with torch.no_grad():
        for record, plan in zip(report.folded, plans):
            if plan.written:
                _write(state, original, fused, record)
    return state


def _report_of(original: object, fused: object, caller: str) -> object:
    for label, value in (("original", original), ("fused", fused)):
        if not isinstance(value, nn.Module):
            raise TypeError(
                f"{caller}({label}=...) expects a torch.nn.Module, got {type(value).__name__}. "
                f"Call {caller}(model, fuse(model))."
            )
    report = getattr(fused, "fusion_report", None)
    if report is None or not hasattr(report, "folded"):
        raise TypeError(
            f"{caller}(fused=...) expects the module returned by fx_lightning.fuse(), which carries "
            f".fusion_report; got a {type(fused).__name__} without one. Pass fused=fuse(original)."
        )
    return report


def _plan_one(
    record: Folded, original: nn.Module, fused: nn.Module, state: dict[str, Tensor], tied: dict[int, list[str]]
) -> CheckpointFold:
    def kept(reason: str) -> CheckpointFold:
        return CheckpointFold(record.bn, record.layers, False, reason)

    if not record.in_place:
        return kept("the fold lives in generated code, not at the model's own module paths")
    if not record.writable:
        return kept("untraced code around it may read the tensors the original layout would change")
    keys = [k for k in state if any(k.startswith(p + ".") for p in (record.bn, *record.layers))]
    if any(len(tied.get(id(state[k]), ())) > 1 for k in keys):
        return kept("a tensor of it is tied to another module's, which would take the folded value too")
    if record.rule not in (_PRECEDING, _FOLLOWING):
        return kept(f"'{record.rule}' folds are not written in the original layout")
    eps = getattr(_submodule(original, record.bn), "eps", None)
    stats = [f"{record.bn}.running_mean", f"{record.bn}.running_var"]
    if not isinstance(eps, numbers.Real) or not 0 <= eps < 1 or not all(k in state for k in stats):
        return kept(f"'{record.bn}' has no running statistics and eps in [0, 1) to set to the identity")
    for layer in record.layers:
        new = _submodule(fused, layer)
        if new is None or f"{layer}.weight" not in state or getattr(new, "weight", None) is None:
            return kept(f"'{layer}' has no weight at that path in both networks")
        if tuple(new.weight.shape) != tuple(state[f"{layer}.weight"].shape):
            return kept(f"'{layer}' changed shape")
    has_bn_bias = f"{record.bn}.bias" in state and f"{record.bn}.weight" in state
    layer_biases = all(f"{layer}.bias" in state for layer in record.layers)
    if record.rule == _FOLLOWING and not layer_biases:
        return kept(f"'{record.layers[0]}' has no bias to carry the BatchNorm's shift")
    if record.rule == _PRECEDING and not has_bn_bias and not layer_biases:
        return kept(f"neither '{record.bn}' nor the layers have a bias to carry the folded bias")
    return CheckpointFold(record.bn, record.layers, True)


def _write(state: dict[str, Tensor], original: nn.Module, fused: nn.Module, record: Folded) -> None:
    """Write one fold: the layers' folded weights, the BatchNorm as an identity, the bias where it fits."""
    bn = record.bn
    eps = float(_submodule(original, bn).eps)  # type: ignore[union-attr]
    news = [_submodule(fused, layer) for layer in record.layers]
    for layer, new in zip(record.layers, news):
        _assign(state, f"{layer}.weight", new.weight)  # type: ignore[union-attr]
    state[f"{bn}.running_mean"].zero_()
    state[f"{bn}.running_var"].fill_(1.0 - eps)
    if f"{bn}.weight" in state:
        state[f"{bn}.weight"].fill_(1.0)
    if f"{bn}.bias" in state:
        state[f"{bn}.bias"].zero_()
    biases = [new.bias for new in news]  # type: ignore[union-attr]
    if record.rule == _PRECEDING and f"{bn}.bias" in state and f"{bn}.weight" in state:
        # The BatchNorm carries the concatenated folded biases; the layers' own biases become 0.
        _assign(state, f"{bn}.bias", torch.cat([b.detach().reshape(-1) for b in biases]))
        for layer in record.layers:
            if f"{layer}.bias" in state:
                state[f"{layer}.bias"].zero_()
    else:
        for layer, bias in zip(record.layers, biases):
            _assign(state, f"{layer}.bias", bias)


def _tied(state: dict[str, Tensor]) -> dict[int, list[str]]:
    """The state-dict keys of each tensor object (tied parameters appear under several keys)."""
    keys: dict[int, list[str]] = {}
    for key, value in state.items():
        keys.setdefault(id(value), []).append(key)
    return keys


def _assign(state: dict[str, Tensor], key: str, value: Tensor) -> None:
    target = state[key]
    state[key] = value.detach().to(dtype=target.dtype, device=target.device, copy=True).reshape(target.shape)


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None

"""Pure tensor maths for folding an inference-mode BatchNorm into a neighbouring layer.

Nothing here knows about fx, modules or Lightning: every function takes tensors and returns tensors.
The arithmetic runs in float64 and the results are cast back to the layer's dtype, so that folding a
float16/bfloat16 model adds one rounding per weight and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BatchNormStats:
    """The constants an inference-mode BatchNorm applies: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``weight``/``bias`` are ``None`` for a BatchNorm built with ``affine=False``.
    """

    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """Return ``(scale, shift)`` in float64 on a float64-capable device, so that ``BN(x) = scale * x + shift``."""
        mean = _f64(self.running_mean)
        var = _f64(self.running_var)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * _f64(self.weight)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + _f64(self.bias)
        return scale, shift


def _f64(t: Tensor) -> Tensor:
    # MPS has no float64; do the maths on the CPU there and move the result back when casting.
    t = t.detach()
    if t.device.type == "mps":
        t = t.cpu()
    return t.to(torch.float64)


def _cast_like(value: Tensor, like: Tensor) -> Tensor:
    """Cast ``value`` to ``like``'s dtype and device, keeping ``like``'s strides (e.g. channels-last)."""
    out = torch.empty_like(like)
    out.copy_(value.to(device=like.device))
    return out


# Rows of float64 temporaries per step when scaling a weight: bounds the peak extra memory of a fold
# to the new weight plus 2 MiB, instead of two float64 copies of the whole weight.
_CHUNK_ELEMENTS = 1 << 18


def _scale_rows(weight: Tensor, row_scale: Tensor) -> Tensor:
    """``weight * row_scale[:, None, ...]`` computed in float64 a chunk of rows at a time, in ``weight``'s layout."""
    out = torch.empty_like(weight)
    rows = weight.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, weight[0].numel()))
    trailing = [1] * (weight.dim() - 1)
    for start in range(0, rows, step):
        chunk = _f64(weight[start : start + step]) * row_scale[start : start + step].reshape(-1, *trailing)
        out[start : start + step].copy_(chunk.to(device=weight.device))
    return out


def _zeros_bias(weight: Tensor, out_features: int) -> Tensor:
    return torch.zeros(out_features, dtype=weight.dtype, device=weight.device)


def fold_bn_after_conv(
    weight: Tensor,
    bias: Tensor | None,
    bn: BatchNormStats,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``BN(conv(x))`` into one convolution.

    Args:
        weight: the convolution weight, ``(out, in/groups, *k)`` or, when ``transposed``, ``(in, out/groups, *k)``.
        bias: the convolution bias or ``None``.
        bn: the BatchNorm constants over the convolution's output channels.
        transposed: whether the weight is a transposed convolution's.
        groups: the convolution's ``groups``; only used for transposed weights, whose output channels are
            spread over dim 1 within each group.

    Returns:
        ``(weight, bias)`` of the folded convolution, in the input weight's dtype, device and strides.

    Example:
        >>> w, b = torch.ones(2, 1, 1, 1), None
        >>> stats = BatchNormStats(torch.zeros(2), torch.full((2,), 4.0), eps=0.0, weight=torch.ones(2))
        >>> fold_bn_after_conv(w, b, stats)[0].flatten().tolist()
        [0.5, 0.5]
    """
    scale, shift = bn.scale_shift()
    if transposed:
        w = _f64(weight)
        k_dims = [1] * (w.dim() - 2)
        in_ch, out_per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
        folded_w = _cast_like((grouped * scale.reshape(groups, 1, out_per_group, *k_dims)).reshape(w.shape), weight)
    else:
        folded_w = _scale_rows(weight, scale)
    out_features = scale.numel()
    b = _f64(bias) if bias is not None else torch.zeros(out_features, dtype=torch.float64, device=scale.device)
    folded_b = b * scale + shift
    like_b = bias if bias is not None else _zeros_bias(weight, out_features)
    return folded_w, _cast_like(folded_b, like_b)


def fold_bn_after_linear(weight: Tensor, bias: Tensor | None, bn: BatchNormStats) -> tuple[Tensor, Tensor]:
    """Fold ``BN(linear(x))`` for a 2-D input into one linear layer (BN normalises the output features)."""
    scale, shift = bn.scale_shift()
    b = _f64(bias) if bias is not None else torch.zeros_like(scale)
    folded_b = b * scale + shift
    like_b = bias if bias is not None else _zeros_bias(weight, weight.shape[0])
    return _scale_rows(weight, scale), _cast_like(folded_b, like_b)


def fold_bn_before_conv(
    weight: Tensor, bias: Tensor | None, bn: BatchNormStats, *, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold ``conv(BN(x))`` into one convolution; exact only when the convolution pads nothing.

    With padding, the convolution would see zeros where ``BN`` would have produced ``shift``, so callers
    must check ``padding == 0`` first.
    """
    scale, shift = bn.scale_shift()
    w = _f64(weight)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    k_dims = [1] * (w.dim() - 2)
    # Output channel o of group g reads input channels g*in_per_group ... (g+1)*in_per_group - 1.
    grouped = w.reshape(groups, out_ch // groups, in_per_group, *w.shape[2:])
    scale_g = scale.reshape(groups, 1, in_per_group, *k_dims)
    shift_g = shift.reshape(groups, 1, in_per_group, *k_dims)
    folded_w = (grouped * scale_g).reshape(w.shape)
    extra_b = (grouped * shift_g).sum(dim=tuple(range(2, grouped.dim()))).reshape(out_ch)
    b = _f64(bias) if bias is not None else torch.zeros(out_ch, dtype=torch.float64, device=extra_b.device)
    like_b = bias if bias is not None else _zeros_bias(weight, out_ch)
    return _cast_like(folded_w, weight), _cast_like(b + extra_b, like_b)


def fold_bn_before_linear(weight: Tensor, bias: Tensor | None, bn: BatchNormStats) -> tuple[Tensor, Tensor]:
    """Fold ``linear(BN(x))`` for a 2-D input into one linear layer (BN normalises the input features)."""
    scale, shift = bn.scale_shift()
    w = _f64(weight)
    folded_w = w * scale[None, :]
    b = _f64(bias) if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    like_b = bias if bias is not None else _zeros_bias(weight, weight.shape[0])
    return _cast_like(folded_w, weight), _cast_like(b + w @ shift, like_b)

"""Pure tensor maths for folding: a BatchNorm or a constant affine op into a neighbouring layer, and parallel
branches into one convolution (structural re-parameterisation).

Nothing here knows about fx, modules or Lightning: every function takes tensors and returns tensors.
The arithmetic runs in float64. What becomes a layer's weight or bias (the ``fold_*`` functions,
:func:`scale_output_channels`) comes back in that layer's dtype, device and strides, so that folding a
float16/bfloat16 model adds one rounding per weight and nothing more. The branch kernels
(:func:`identity_kernel`, :func:`average_kernel`, :func:`sum_branches`, ...) stay in float64 until the merged
kernel is cast back once with :func:`cast_like`.

Sections: float64 and casting back; output-channel scaling; affine folds (BatchNorm and constant
scale/shift); branch kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# --- float64 and casting back --------------------------------------------------------------------------------


def _maths_device(t: Tensor) -> torch.device:
    # MPS has no float64; the maths for its tensors runs on the CPU and the result moves back when cast.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device=_maths_device(t), dtype=torch.float64)


def cast_like(value: Tensor, like: Tensor) -> Tensor:
    """Cast a float64 result to ``like``'s dtype and device, in ``like``'s memory layout.

    With ``like``'s shape the result has ``like``'s strides (a channels-last weight stays channels-last).
    With another shape (a merged kernel larger than the layer it replaces) it is channels-last if ``like``
    is, and contiguous otherwise.

    Args:
        value: the result to cast, usually float64.
        like: the tensor whose dtype, device and layout the result takes.

    Returns:
        A new tensor with ``value``'s shape and values, rounded once to ``like``'s dtype.

    Example:
        >>> like = torch.zeros(2, 3, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        >>> out = cast_like(torch.ones(2, 3, 5, 5, dtype=torch.float64), like)
        >>> out.dtype, out.is_contiguous(memory_format=torch.channels_last)
        (torch.float16, True)
    """
    if value.shape == like.shape:
        out = torch.empty_like(like)
        out.copy_(value.to(device=like.device))
        return out
    out = value.to(device=like.device, dtype=like.dtype)
    for dims, memory_format in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if like.dim() == dims and like.is_contiguous(memory_format=memory_format) and not like.is_contiguous():
            return out.contiguous(memory_format=memory_format)
    return out.contiguous()


def _zeros_bias(weight: Tensor, out_features: int) -> Tensor:
    return torch.zeros(out_features, dtype=weight.dtype, device=weight.device)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every value of every tensor is finite (a fold that overflows the dtype is not exact)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --- output-channel scaling ----------------------------------------------------------------------------------

# Elements of float64 temporaries per step when scaling a weight: bounds the peak extra memory of a fold
# to the new weight plus 2 MiB, instead of two float64 copies of the whole weight.
_CHUNK_ELEMENTS = 1 << 18


def _scale_rows(weight: Tensor, factors: Tensor) -> Tensor:
    """``weight * factors`` in float64 a chunk of rows (dim 0) at a time, in ``weight``'s dtype and layout.

    ``factors`` covers ``weight``'s leading dims (``(rows,)`` or ``(rows, cols)``) and broadcasts over the rest.
    """
    out = torch.empty_like(weight)
    step = max(1, _CHUNK_ELEMENTS // max(1, math.prod(weight.shape[1:])))
    trailing = [1] * (weight.dim() - factors.dim())
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        chunk = _f64(weight[rows]) * factors[rows].reshape(*factors[rows].shape, *trailing)
        out[rows].copy_(chunk.to(device=weight.device))
    return out


def scale_output_channels(weight: Tensor, scale: Tensor, *, transposed: bool = False, groups: int = 1) -> Tensor:
    """Multiply each output channel ``o`` of a layer weight by ``scale[o]``, in float64.

    The product is formed a few rows at a time, so the extra memory stays small whatever the weight's size.

    Args:
        weight: ``(out, in/groups, *k)`` for a convolution, ``(out, in)`` for a linear layer, or, when
            ``transposed``, a transposed convolution's ``(in, out/groups, *k)``.
        scale: one factor per output channel.
        transposed: whether ``weight`` is a transposed convolution's, whose output channels lie along dim 1
            within each group.
        groups: the transposed convolution's ``groups``; unused otherwise.

    Returns:
        The scaled weight in ``weight``'s dtype, device and strides.

    Raises:
        ValueError: if ``scale`` does not hold one value per output channel.

    Example:
        >>> weight, scale = torch.ones(2, 1, 1), torch.tensor([2.0, 3.0])
        >>> scale_output_channels(weight, scale).flatten().tolist()
        [2.0, 3.0]
        >>> scale_output_channels(weight, scale, transposed=True, groups=2).flatten().tolist()  # (in, out/groups, k)
        [2.0, 3.0]
    """
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    if scale.numel() != out_channels:
        raise ValueError(
            f"scale_output_channels(weight of shape {tuple(weight.shape)}, scale of {scale.numel()} values, "
            f"transposed={transposed}, groups={groups}) needs one scale per output channel, {out_channels}."
        )
    factors = _f64(scale).to(_maths_device(weight)).reshape(-1)
    if transposed:
        rows, out_per_group = weight.shape[0], weight.shape[1]
        # Input row r belongs to group g = r // (rows / groups), whose output channels sit along dim 1.
        per_group = factors.reshape(groups, 1, out_per_group).expand(groups, rows // groups, out_per_group)
        factors = per_group.reshape(rows, out_per_group)
    return _scale_rows(weight, factors)


# --- affine folds: BatchNorm and constant scale/shift --------------------------------------------------------


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


def constant_affine(
    op: str, constant: Tensor | float, *, layer_first: bool, alpha: float = 1.0
) -> tuple[Tensor, Tensor] | None:
    """Express ``op`` between a layer output ``y`` and a constant ``c`` as ``scale * y + shift``, in float64.

    Args:
        op: one of ``"mul"``, ``"div"``, ``"add"``, ``"sub"``.
        constant: the constant, a tensor or a Python number.
        layer_first: whether ``y`` is the first operand (``y - c``) or the second (``c - y``).
        alpha: the ``alpha`` of ``torch.add``/``torch.sub``, which multiplies the second operand.

    Returns:
        ``(scale, shift)``, broadcastable like ``constant``, or ``None`` when the op is not affine in ``y``
        (``c / y``) or not exact (division by a constant containing zeros).

    Example:
        >>> constant_affine("sub", 2.0, layer_first=False)
        (tensor(-1., dtype=torch.float64), tensor(2., dtype=torch.float64))
    """
    c = _f64(constant) if isinstance(constant, Tensor) else torch.tensor(float(constant), dtype=torch.float64)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if op == "mul":
        return c, zero
    if op == "div":
        if not layer_first or bool((c == 0).any()):
            return None
        return 1.0 / c, zero
    if op in ("add", "sub"):
        sign = 1.0 if op == "add" else -1.0
        if layer_first:
            return one, sign * alpha * c
        return sign * alpha * one, c
    raise ValueError(f"constant_affine(op={op!r}) expects one of 'mul', 'div', 'add', 'sub'.")


_LAYOUTS = ("conv", "conv_transpose", "linear")


def fold_affine_after_layer(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    layout: str = "conv",
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``scale[o] * layer(x) + shift[o]`` into the layer's weight and bias.

    Args:
        weight: the layer weight: ``(out, in/groups, *k)`` for ``layout="conv"``, ``(in, out/groups, *k)`` for
            ``"conv_transpose"``, ``(out, in)`` for ``"linear"``.
        bias: the layer bias or ``None``.
        scale: one value per output channel; float64 keeps full precision (any dtype is widened to it).
        shift: one value per output channel, likewise.
        layout: which kind of layer ``weight`` belongs to.
        groups: the convolution's ``groups`` (used by transposed convolutions, whose output channels
            lie along dim 1 within each group).

    Returns:
        ``(weight, bias)`` in the input weight's dtype, device and strides.

    Raises:
        ValueError: for an unknown ``layout``, or a ``scale`` without one value per output channel.

    Example:
        >>> scale, shift = torch.tensor([2.0, 3.0]), torch.ones(2)
        >>> w, b = fold_affine_after_layer(torch.ones(2, 3), None, scale, shift, layout="linear")
        >>> w[:, 0].tolist(), b.tolist()
        ([2.0, 3.0], [1.0, 1.0])
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"fold_affine_after_layer(layout={layout!r}) expects one of {', '.join(map(repr, _LAYOUTS))}.")
    transposed = layout == "conv_transpose"
    folded_w = scale_output_channels(weight, scale, transposed=transposed, groups=groups)
    out_features = weight.shape[1] * groups if transposed else weight.shape[0]
    device = _maths_device(weight)
    b = _f64(bias) if bias is not None else torch.zeros(out_features, dtype=torch.float64, device=device)
    folded_b = b * _f64(scale).to(device) + _f64(shift).to(device)
    like_b = bias if bias is not None else _zeros_bias(weight, out_features)
    return folded_w, cast_like(folded_b, like_b)


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
    layout = "conv_transpose" if transposed else "conv"
    return fold_affine_after_layer(weight, bias, scale, shift, layout=layout, groups=groups)


def fold_bn_after_linear(weight: Tensor, bias: Tensor | None, bn: BatchNormStats) -> tuple[Tensor, Tensor]:
    """Fold ``BN(linear(x))`` for a 2-D input into one linear layer (BN normalises the output features)."""
    scale, shift = bn.scale_shift()
    return fold_affine_after_layer(weight, bias, scale, shift, layout="linear")


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
    return cast_like(folded_w, weight), cast_like(b + extra_b, like_b)


def fold_bn_before_linear(weight: Tensor, bias: Tensor | None, bn: BatchNormStats) -> tuple[Tensor, Tensor]:
    """Fold ``linear(BN(x))`` for a 2-D input into one linear layer (BN normalises the input features)."""
    scale, shift = bn.scale_shift()
    w = _f64(weight)
    folded_w = w * scale[None, :]
    b = _f64(bias) if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    like_b = bias if bias is not None else _zeros_bias(weight, weight.shape[0])
    return cast_like(folded_w, weight), cast_like(b + w @ shift, like_b)


# --- branch kernels: parallel convolutions, identities and average pools as one convolution ------------------


def window_offset(kernel_size: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """``2 * padding - dilation * (kernel - 1)`` per dimension: where a convolution's windows sit on its input.

    Two convolutions (or average pools) with the same stride, dilation and offset have the same output size on
    every input, and their windows are centred on the same input positions; their kernels then add up once
    centred to the larger size (:func:`centred_kernel`).

    Example:
        >>> window_offset((3, 1), (1, 0), (1, 1))
        (0, 0)
    """
    return tuple(2 * p - d * (k - 1) for k, p, d in zip(kernel_size, padding, dilation))


def padding_for_offset(offset: Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """The padding that gives a ``kernel_size`` convolution the window ``offset`` (inverse of
    :func:`window_offset`).

    Example:
        >>> padding_for_offset((0, 0), (5, 3), (1, 2))
        (2, 2)
    """
    return tuple((o + d * (k - 1)) // 2 for o, d, k in zip(offset, dilation, kernel_size))


def centred_kernel(weight: Tensor, kernel_size: Sequence[int]) -> Tensor:
    """Zero-pad a convolution weight ``(out, in/groups, *k)`` evenly on every side to ``kernel_size``.

    A convolution with the padded kernel and ``(K - k) / 2 * dilation`` more padding computes the same
    output as the original, which is what lets branches with different kernels share one convolution.

    Args:
        weight: the convolution weight; each spatial size must differ from ``kernel_size`` by an even number.
        kernel_size: the target spatial size, at least the weight's in every dimension.

    Returns:
        The padded kernel in float64.

    Example:
        >>> centred_kernel(torch.ones(1, 1, 1, 1), (3, 3))[0, 0].tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    w = _f64(weight)
    pads: list[int] = []
    for size, target in zip(reversed(w.shape[2:]), reversed(list(kernel_size))):
        extra = target - size
        if extra < 0 or extra % 2:
            raise ValueError(
                f"centred_kernel(weight of shape {tuple(weight.shape)}, kernel_size={tuple(kernel_size)}) needs "
                f"target sizes at least the weight's and differing by an even number; got {size} -> {target}."
            )
        pads += [extra // 2, extra // 2]
    return torch.nn.functional.pad(w, pads) if any(pads) else w


def identity_kernel(channels: int, groups: int, dims: int, device: torch.device | None = None) -> Tensor:
    """The float64 ``(channels, channels/groups, 1, ...)`` kernel of a convolution that returns its input.

    Output channel ``o`` reads input channel ``o``, which sits at index ``o % (channels/groups)`` of its group.

    Example:
        >>> identity_kernel(2, groups=1, dims=1)[..., 0].tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *([1] * dims), dtype=torch.float64, device=device)
    index = torch.arange(channels, device=device)
    kernel[(index, index % per_group) + (0,) * dims] = 1.0
    return kernel


def average_kernel(
    channels: int, groups: int, pool_size: Sequence[int], divisor: float, device: torch.device | None = None
) -> Tensor:
    """The float64 kernel of a convolution that averages each channel over ``pool_size`` windows, over ``divisor``.

    Equals an average pool with ``count_include_pad=True`` (or no padding) and no ``ceil_mode``.

    Example:
        >>> average_kernel(1, 1, (2,), divisor=2.0)[0, 0].tolist()
        [0.5, 0.5]
    """
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *pool_size, dtype=torch.float64, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % per_group] = 1.0 / divisor
    return kernel


def pool_divisor(pool_size: Sequence[int], divisor_override: int | None) -> float:
    """The number an average pool divides each window sum by."""
    return float(divisor_override) if divisor_override else float(math.prod(pool_size))


def sum_branches(
    kernels: Sequence[tuple[float, Tensor, Tensor | None]], kernel_size: Sequence[int], constant: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Sum parallel convolution branches ``coefficient * (conv(x; kernel) + bias)`` into one kernel and bias.

    Args:
        kernels: ``(coefficient, kernel, bias)`` per branch; kernels share output channels, groups, stride and
            dilation, and are centred (:func:`centred_kernel`) to ``kernel_size``; ``bias`` may be ``None``.
        kernel_size: the merged kernel's spatial size.
        constant: a number added to every output.

    Returns:
        ``(kernel, bias)`` of the merged convolution, in float64.

    Example:
        >>> w, b = sum_branches([(1.0, torch.ones(1, 1, 3), None), (2.0, torch.ones(1, 1, 1), torch.ones(1))], (3,))
        >>> w[0, 0].tolist(), b.tolist()
        ([1.0, 3.0, 1.0], [2.0])
    """
    total_w: Tensor | None = None
    total_b: Tensor | None = None
    for coefficient, kernel, bias in kernels:
        w = centred_kernel(kernel, kernel_size) * coefficient
        total_w = w if total_w is None else total_w + w.to(total_w.device)
        if bias is not None:
            b = _f64(bias).to(w.device) * coefficient
            total_b = b if total_b is None else total_b + b
    if total_w is None:
        raise ValueError("sum_branches(kernels=[]) needs at least one branch.")
    if total_b is None:
        total_b = torch.zeros(total_w.shape[0], dtype=torch.float64, device=total_w.device)
    return total_w, total_b + constant

"""Pure tensor maths for structural re-parameterisation: kernels of parallel branches, and constant affine ops.

Nothing here knows about fx, modules or Lightning. Every function works in float64 and returns float64
tensors, except :func:`cast_weight` and :func:`fold_affine_after_layer`, which cast back to the layer's
dtype, so that a float16/bfloat16 model gets one rounding per folded weight and nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fx_lightning.folding import _cast_like, _f64


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
    """The ``(channels, channels/groups, 1, ...)`` kernel of a convolution that returns its input.

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
    """The kernel of a convolution that averages each channel over ``pool_size`` windows, dividing by ``divisor``.

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


def scale_output_channels(kernel: Tensor, scale: Tensor) -> Tensor:
    """Multiply each output channel of a float64 ``(out, in/groups, *k)`` kernel by ``scale[out]``."""
    return kernel * scale.to(kernel).reshape(-1, *([1] * (kernel.dim() - 1)))


def cast_weight(value: Tensor, like: Tensor) -> Tensor:
    """Cast a float64 result to ``like``'s dtype and device, channels-last if ``like`` is, whatever its shape."""
    out = value.to(device=like.device, dtype=like.dtype)
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    if like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out.contiguous()


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
        scale: per-output-channel scale, float64, one value per output channel.
        shift: per-output-channel shift, float64, one value per output channel.
        layout: which kind of layer ``weight`` belongs to.
        groups: the convolution's ``groups`` (used by transposed convolutions, whose output channels
            lie along dim 1 within each group).

    Returns:
        ``(weight, bias)`` in the input weight's dtype, device and strides.

    Example:
        >>> scale, shift = torch.tensor([2.0, 3.0]), torch.ones(2)
        >>> w, b = fold_affine_after_layer(torch.ones(2, 3), None, scale, shift, layout="linear")
        >>> w[:, 0].tolist(), b.tolist()
        ([2.0, 3.0], [1.0, 1.0])
    """
    w = _f64(weight)
    scale = scale.to(device=w.device)
    shift = shift.to(device=w.device)
    if layout == "conv_transpose":
        in_ch, out_per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
        folded_w = (grouped * scale.reshape(groups, 1, out_per_group, *([1] * (w.dim() - 2)))).reshape(w.shape)
        out_features = out_per_group * groups
    else:
        folded_w = scale_output_channels(w, scale)
        out_features = w.shape[0]
    b = _f64(bias) if bias is not None else torch.zeros(out_features, dtype=torch.float64, device=w.device)
    folded_b = b * scale + shift
    like_b = bias if bias is not None else torch.zeros(out_features, dtype=weight.dtype, device=weight.device)
    return _cast_like(folded_w, weight), _cast_like(folded_b, like_b)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every value of every tensor is finite (a fold that overflows the dtype is not exact)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


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

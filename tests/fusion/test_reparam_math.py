"""The re-parameterisation maths (kernels of parallel branches, constant affine folds) against direct float64
computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fx_lightning.fusion.maths import (
    average_kernel,
    centred_kernel,
    constant_affine,
    fold_affine_after_layer,
    identity_kernel,
    padding_for_offset,
    sum_branches,
    window_offset,
)


def test_centred_kernel_conv_equals_smaller_kernel_with_less_padding() -> None:
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    w = torch.randn(6, 4, 1, 3, dtype=torch.float64)
    big = centred_kernel(w, (3, 5))
    assert big.shape == (6, 4, 3, 5)
    expected = F.conv2d(x, w, padding=(1, 1), dilation=2)
    torch.testing.assert_close(F.conv2d(x, big, padding=(3, 3), dilation=2), expected)


def test_centred_kernel_rejects_odd_size_difference() -> None:
    with pytest.raises(ValueError, match=r"differing by an even number; got 2 -> 3"):
        centred_kernel(torch.ones(1, 1, 2, 2), (3, 3))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_kernel_returns_input(groups: int) -> None:
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, identity_kernel(6, groups, 2), groups=groups), x)


@pytest.mark.parametrize("groups", [1, 3])
def test_average_kernel_equals_avg_pool(groups: int) -> None:
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    kernel = average_kernel(6, groups, (3, 3), divisor=9.0)
    expected = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(F.conv2d(x, kernel, padding=1, groups=groups), expected)


def test_sum_branches_equals_sum_of_convolutions() -> None:
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w3, b3 = torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w1 = torch.randn(4, 4, 1, 1, dtype=torch.float64)
    weight, bias = sum_branches([(1.0, w3, b3), (-2.0, w1, None)], (3, 3), constant=0.5)
    expected = F.conv2d(x, w3, b3, padding=1) - 2.0 * F.conv2d(x, w1) + 0.5
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), expected)


def test_sum_branches_rejects_no_branches() -> None:
    with pytest.raises(ValueError, match=r"needs at least one branch"):
        sum_branches([], (3, 3))


@pytest.mark.parametrize(
    ("op", "layer_first", "alpha", "expected"),
    [
        ("mul", True, 1.0, lambda y, c: y * c),
        ("div", True, 1.0, lambda y, c: y / c),
        ("add", False, 2.0, lambda y, c: c + 2.0 * y),
        ("sub", True, 3.0, lambda y, c: y - 3.0 * c),
        ("sub", False, 1.0, lambda y, c: c - y),
    ],
)
def test_constant_affine_matches_operation(op: str, layer_first: bool, alpha: float, expected: object) -> None:
    y, c = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    scale, shift = constant_affine(op, c, layer_first=layer_first, alpha=alpha)
    torch.testing.assert_close(scale * y + shift, expected(y, c))  # type: ignore[operator]


def test_constant_affine_refuses_inexact_division() -> None:
    assert constant_affine("div", torch.tensor([1.0, 0.0]), layer_first=True) is None
    assert constant_affine("div", 2.0, layer_first=False) is None


def test_constant_affine_rejects_unknown_op() -> None:
    with pytest.raises(ValueError, match=r"constant_affine\(op='pow'\) expects one of"):
        constant_affine("pow", 2.0, layer_first=True)


def test_fold_affine_after_grouped_conv_transpose() -> None:
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    w, b = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    scale, shift = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    fw, fb = fold_affine_after_layer(w, b, scale, shift, layout="conv_transpose", groups=2)
    expected = F.conv_transpose2d(x, w, b, groups=2) * scale[:, None, None] + shift[:, None, None]
    torch.testing.assert_close(F.conv_transpose2d(x, fw, fb, groups=2), expected)
    assert fb.dtype == w.dtype


@pytest.mark.parametrize(
    ("kernel", "padding", "dilation"), [((3, 3), (1, 1), (1, 1)), ((1, 5), (0, 4), (1, 2)), ((4,), (2,), (3,))]
)
def test_window_offset_equal_means_same_output_size_and_padding_for_offset_inverts_it(
    kernel: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]
) -> None:
    dims = len(kernel)
    conv = getattr(F, f"conv{dims}d")
    x = torch.randn(1, 1, *([11] * dims), dtype=torch.float64)
    offset = window_offset(kernel, padding, dilation)
    assert padding_for_offset(offset, kernel, dilation) == padding
    # a 1-sized kernel at the same offset (where one exists) gives the same output size
    ones = (1,) * dims
    small = padding_for_offset(offset, ones, dilation)
    if window_offset(ones, small, dilation) == offset:
        big_out = conv(x, torch.ones(1, 1, *kernel, dtype=torch.float64), padding=padding, dilation=dilation)
        small_out = conv(x, torch.ones(1, 1, *ones, dtype=torch.float64), padding=small, dilation=dilation)
        assert big_out.shape == small_out.shape

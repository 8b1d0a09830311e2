"""The folding maths against a reference: the unfolded layers run by torch, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fx_lightning.fusion.maths import (
    BatchNormStats,
    cast_like,
    fold_affine_after_layer,
    fold_bn_after_conv,
    fold_bn_after_linear,
    fold_bn_before_conv,
    fold_bn_before_linear,
    scale_output_channels,
)
from numerics import rel_err


def _stats(c: int, affine: bool = True, dtype: torch.dtype = torch.float64) -> BatchNormStats:
    g = torch.Generator().manual_seed(c)
    return BatchNormStats(
        torch.randn(c, generator=g, dtype=dtype),
        torch.rand(c, generator=g, dtype=dtype) + 0.5,
        1e-3,
        torch.randn(c, generator=g, dtype=dtype) if affine else None,
        torch.randn(c, generator=g, dtype=dtype) if affine else None,
    )


def _bn(x: torch.Tensor, s: BatchNormStats) -> torch.Tensor:
    return F.batch_norm(x, s.running_mean, s.running_var, s.weight, s.bias, False, 0.0, s.eps)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_fold_bn_after_conv_matches_conv_then_bn(bias: bool, affine: bool, groups: int) -> None:
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    w = torch.randn(8, 4 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64) if bias else None
    stats = _stats(8, affine)
    ref = _bn(F.conv2d(x, w, b, padding=1, groups=groups), stats)
    fw, fb = fold_bn_after_conv(w, b, stats)
    assert rel_err(F.conv2d(x, fw, fb, padding=1, groups=groups), ref) < 1e-12


@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 4, 1), (4, 4, 2), (4, 4, 4), (4, 6, 2), (6, 4, 2)])
def test_fold_bn_after_conv_transposed_grouped(cin: int, cout: int, groups: int) -> None:
    # in_channels == out_channels with groups > 1 is where a fold along the wrong dim still has the right shape.
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    w = torch.randn(cin, cout // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64)
    stats = _stats(cout)
    ref = _bn(F.conv_transpose2d(x, w, b, stride=2, groups=groups), stats)
    fw, fb = fold_bn_after_conv(w, b, stats, transposed=True, groups=groups)
    assert rel_err(F.conv_transpose2d(x, fw, fb, stride=2, groups=groups), ref) < 1e-12


@pytest.mark.parametrize("bias", [True, False])
def test_fold_bn_after_linear_matches_linear_then_bn(bias: bool) -> None:
    x = torch.randn(5, 6, dtype=torch.float64)
    w, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64) if bias else None
    stats = _stats(3)
    fw, fb = fold_bn_after_linear(w, b, stats)
    assert rel_err(F.linear(x, fw, fb), _bn(F.linear(x, w, b), stats)) < 1e-12


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_fold_bn_before_conv_matches_bn_then_unpadded_conv(groups: int) -> None:
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    w = torch.randn(8, 4 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    stats = _stats(4)
    ref = F.conv2d(_bn(x, stats), w, b, stride=2, groups=groups)
    fw, fb = fold_bn_before_conv(w, b, stats, groups=groups)
    assert rel_err(F.conv2d(x, fw, fb, stride=2, groups=groups), ref) < 1e-12


def test_fold_bn_before_linear_matches_bn_then_linear() -> None:
    x = torch.randn(5, 6, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64)
    stats = _stats(6)
    fw, fb = fold_bn_before_linear(w, None, stats)
    assert rel_err(F.linear(x, fw, fb), F.linear(_bn(x, stats), w)) < 1e-12


def test_fold_bn_after_conv_keeps_dtype_and_channels_last() -> None:
    w = torch.randn(8, 4, 3, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    fw, fb = fold_bn_after_conv(w, None, _stats(8, dtype=torch.float32))
    assert fw.dtype == fb.dtype == torch.bfloat16
    assert fw.is_contiguous(memory_format=torch.channels_last)


def test_fold_bn_after_conv_rounds_once_in_low_precision() -> None:
    # The fold runs in float64: the bf16 result is the float64 result rounded once.
    w = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    stats = _stats(8, dtype=torch.float32)
    fw, _ = fold_bn_after_conv(w, None, stats)
    exact, _ = fold_bn_after_conv(w.double(), None, stats)
    assert torch.equal(fw, exact.to(torch.bfloat16))


def test_fold_bn_after_conv_in_chunks_matches_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import fx_lightning.fusion.maths as folding

    w = torch.randn(10, 3, 3, 3)
    stats = _stats(10, dtype=torch.float32)
    whole, _ = fold_bn_after_conv(w, None, stats)
    monkeypatch.setattr(folding, "_CHUNK_ELEMENTS", 27 * 3)  # three rows per step, last step shorter
    chunked, _ = fold_bn_after_conv(w, None, stats)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize(("transposed", "groups"), [(False, 1), (True, 1), (True, 2)])
def test_scale_output_channels_in_chunks_matches_whole(
    monkeypatch: pytest.MonkeyPatch, transposed: bool, groups: int
) -> None:
    import fx_lightning.fusion.maths as folding

    w = torch.randn(10, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    scale = torch.randn(6 * groups if transposed else 10, dtype=torch.float64)
    whole = scale_output_channels(w, scale, transposed=transposed, groups=groups)
    monkeypatch.setattr(folding, "_CHUNK_ELEMENTS", 54 * 3)  # three rows per step, last step shorter
    chunked = scale_output_channels(w, scale, transposed=transposed, groups=groups)
    assert torch.equal(whole, chunked)
    assert chunked.stride() == w.stride()
    if transposed:
        # Output channel o of group g is column o % (out/groups) of that group's rows.
        expected = w.double().reshape(groups, 10 // groups, 6, 3, 3) * scale.reshape(groups, 1, 6, 1, 1)
    else:
        expected = w.double() * scale.reshape(-1, 1, 1, 1)
    assert torch.equal(chunked, expected.reshape(w.shape).float())


def test_scale_output_channels_rejects_wrong_count() -> None:
    with pytest.raises(ValueError, match=r"transposed=True, groups=2\) needs one scale per output channel, 6\."):
        scale_output_channels(torch.ones(4, 3, 1, 1), torch.ones(3), transposed=True, groups=2)


def test_fold_affine_after_layer_rejects_unknown_layout() -> None:
    with pytest.raises(ValueError, match=r"fold_affine_after_layer\(layout='conv1d'\) expects one of 'conv', "):
        fold_affine_after_layer(torch.ones(2, 1, 1), None, torch.ones(2), torch.zeros(2), layout="conv1d")


def test_cast_like_keeps_strides_of_same_shape_and_format_of_another() -> None:
    like = torch.zeros(4, 3, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    same = cast_like(torch.randn(4, 3, 3, 3, dtype=torch.float64), like)
    assert (same.dtype, same.stride()) == (torch.float16, like.stride())
    larger = cast_like(torch.randn(4, 3, 5, 5, dtype=torch.float64), like)
    assert larger.dtype == torch.float16
    assert larger.is_contiguous(memory_format=torch.channels_last)
    assert cast_like(torch.randn(4, 3, 5, 5, dtype=torch.float64), like.contiguous()).is_contiguous()

"""fold_constant_scale: a constant *, /, +, - after a conv/linear folds into its weights only where exact."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import Tensor, fx, nn

from fx_lightning import fuse
from fx_lightning.fusion.counting import count_kernels
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err

RTOL = 1e-5
_ARITHMETIC = {
    operator.mul,
    operator.truediv,
    operator.add,
    operator.sub,
    torch.mul,
    torch.div,
    torch.add,
    torch.sub,
    "mul",
    "div",
    "add",
    "sub",
    "mul_",
    "div_",
    "add_",
    "sub_",
}


def _arithmetic_left(gm: nn.Module) -> int:
    # fuse() returns a model it did not change as an eval-mode copy of the module itself.
    gm = gm if isinstance(gm, fx.GraphModule) else fx.symbolic_trace(gm)
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in _ARITHMETIC)


def _check(model: nn.Module, x: Tensor, left: int, **fuse_kwargs: object) -> nn.Module:
    """Fuse, then assert the arithmetic nodes left, the numbers, the dtype and that the original is untouched."""
    torch.manual_seed(1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        fused = fuse(model, **fuse_kwargs)
        out = fused(x)
    assert _arithmetic_left(fused) == left
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert rel_err(out, ref) <= RTOL
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return fused


class _ConvThen(nn.Module):
    """``fn(conv(x), constant)`` with a per-channel parameter ``gamma`` of the given shape."""

    def __init__(self, fn: object, shape: tuple[int, ...] = (6, 1, 1), conv: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(3, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(shape) + 0.5)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.conv(x), self.gamma)  # type: ignore[operator]


def _x() -> Tensor:
    return torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda y, g: y * 0.25, id="scalar-mul"),
        pytest.param(lambda y, g: 3 * y, id="scalar-rmul"),
        pytest.param(lambda y, g: y / 8, id="scalar-div"),
        pytest.param(lambda y, g: y + 1.5, id="scalar-add"),
        pytest.param(lambda y, g: 2.0 - y, id="scalar-rsub"),
        pytest.param(lambda y, g: y * g, id="layer-scale"),
        pytest.param(lambda y, g: g * y, id="layer-scale-left"),
        pytest.param(lambda y, g: y / g, id="per-channel-div"),
        pytest.param(lambda y, g: g - y, id="per-channel-rsub"),
        pytest.param(lambda y, g: torch.add(y, g, alpha=-0.5), id="torch-add-alpha"),
        pytest.param(lambda y, g: torch.sub(g, y, alpha=2), id="torch-sub-alpha-reversed"),
        pytest.param(lambda y, g: y.mul(g), id="method-mul"),
        pytest.param(lambda y, g: y.mul_(g), id="method-mul-in-place"),
    ],
)
def test_fold_constant_scale_after_conv(fn: object) -> None:
    fused = _check(_ConvThen(fn), _x(), left=0)
    (merged,) = fused.fusion_report.merged
    assert merged.rule == "fold_constant_scale"
    assert merged.into == "conv"


def test_fold_constant_scale_chained_ops_and_report() -> None:
    fused = _check(_ConvThen(lambda y, g: (y * g + 1.0) / 4.0), _x(), left=0)
    report = fused.fusion_report
    assert [m.consumed for m in report.merged] == [("mul(gamma)",), ("add(1.0)",), ("div(4.0)",)]
    assert "re-parameterised" in report.summary()


def test_fold_constant_scale_reshaped_parameter() -> None:
    # ConvNeXt-style ``gamma[:, None, None]`` and ``gamma.view(-1, 1, 1)`` on a (C,) parameter.
    _check(_ConvThen(lambda y, g: y * g[:, None, None], shape=(6,)), _x(), left=0)
    _check(_ConvThen(lambda y, g: y * g.view(-1, 1, 1), shape=(6,)), _x(), left=0)


def test_fold_constant_scale_batched_shape_needs_example_inputs() -> None:
    # (1, C, 1, 1) would add a dim to an unbatched (C, H, W) output; fold it only when shapes say 4-D.
    model = _ConvThen(lambda y, g: y * g, shape=(1, 6, 1, 1))
    _check(model, _x(), left=1)
    _check(model, _x(), left=0, example_inputs=(_x(),))


def test_fold_constant_scale_skips_division_by_zero() -> None:
    model = _ConvThen(lambda y, g: y / g)
    with torch.no_grad():
        model.gamma[2] = 0.0
    with torch.no_grad():  # the outputs hold infinities, so compare exactly rather than by relative error
        fused = fuse(model.eval())
        x = _x()
        assert torch.equal(fused(x), model(x))
    assert _arithmetic_left(fused) == 1
    assert fused.fusion_report.merged == []


def test_fold_constant_scale_skips_constant_divided_by_output() -> None:
    _check(_ConvThen(lambda y, g: g / y), _x(), left=1)


def test_fold_constant_scale_skips_shape_changing_broadcast() -> None:
    # A Conv1d output (1, C, L) times (C, 1, 1) broadcasts to (C, C, L): never folded.
    model = _ConvThen(lambda y, g: y * g, shape=(6, 1, 1), conv=nn.Conv1d(3, 6, 3, padding=1))
    fused = _check(model, torch.randn(1, 3, 6), left=1)
    assert fused(torch.randn(1, 3, 6)).shape == (6, 6, 6)


def test_fold_constant_scale_skips_non_channel_constant() -> None:
    # Varies along width, not channels: not a per-channel scale.
    _check(_ConvThen(lambda y, g: y * g, shape=(6,)), _x(), left=1)


def test_fold_constant_scale_skips_dtype_promotion() -> None:
    model = _ConvThen(lambda y, g: y * g)
    model.gamma.data = model.gamma.data.double()
    fused = _check(model, _x(), left=1)
    assert fused(_x()).dtype == torch.float64


def test_fold_constant_scale_skips_output_read_elsewhere() -> None:
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return y * 2.0 + torch.relu(y)

    _check(TwoReaders(), _x(), left=2)


def test_fold_constant_scale_conv_called_twice_gets_own_layer() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return torch.cat([self.conv(x) * 0.5, self.conv(torch.tanh(x))], 1)

    fused = _check(Shared(), _x(), left=0)
    assert fused.fusion_report.merged[0].into == "conv_folded1"


def test_fold_constant_scale_linear_layer_scale() -> None:
    class TokenMixer(nn.Module):  # ViT/ConvNeXt style: linear on (N, L, C), then gamma of shape (C,)
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.gamma = nn.Parameter(torch.rand(8) * 1e-2)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.fc(x) * self.gamma

    _check(TokenMixer(), torch.randn(2, 5, 8), left=1)


def test_fold_constant_scale_conv_transpose() -> None:
    model = _ConvThen(lambda y, g: y * g - 0.5, conv=nn.ConvTranspose2d(3, 6, 2, stride=2, groups=3))
    _check(model, _x(), left=0)


def test_fold_constant_scale_then_merge_layer_scaled_branches() -> None:
    class ScaledBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
            self.ga = nn.Parameter(torch.rand(4, 1, 1))
            self.gb = nn.Parameter(torch.rand(4, 1, 1))
            self.g = nn.Parameter(torch.rand(4, 1, 1))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            # Branch scales, a scale after the sum, a residual, and a BN after: needs several rounds of passes.
            return self.bn((self.a(x) * self.ga + self.b(x) * self.gb) * self.g + x)

    model = randomize_batch_norm(ScaledBranches())
    x = torch.randn(2, 4, 6, 6)
    fused = _check(model, x, left=0)
    assert count_kernels(fused, x, keyword="convolution") == 1
    assert count_kernels(fused, x, keyword="batch_norm") == 0


def test_fold_constant_scale_half_precision() -> None:
    model = _ConvThen(lambda y, g: y * g + 0.25).to(torch.bfloat16).eval()
    x = _x()
    with torch.no_grad():
        reference = _ConvThen.forward(model.double(), x.double())
        low = model.to(torch.bfloat16)
        fused = fuse(low)
        unfused_err = float((low(x.bfloat16()).double() - reference).norm() / reference.norm())
        fused_err = float((fused(x.bfloat16()).double() - reference).norm() / reference.norm())
    assert _arithmetic_left(fused) == 0
    assert fused.conv.weight.dtype == torch.bfloat16
    assert fused_err <= 1.5 * unfused_err, (fused_err, unfused_err)

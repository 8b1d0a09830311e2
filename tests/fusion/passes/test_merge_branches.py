"""merge_branches: sums of parallel conv/BN/identity/pool branches of one input become one convolution."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fx_lightning import fuse
from fx_lightning.fusion.counting import count_kernels
from fx_lightning.fusion.passes import PassChanges
from fx_lightning.fusion.passes.merge_branches import merge_branches
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err
from reparam_models import MobileOneBlock, RepVGGBlock, mobileone_net, repvgg_net

RTOL = 1e-5


def _convs(model: nn.Module, x: Tensor) -> int:
    return count_kernels(model, x, keyword="convolution")


def _check(model: nn.Module, x: Tensor, convs_left: int, **fuse_kwargs: object) -> nn.Module:
    """Fuse ``model`` and assert the convolutions left, the numbers, and that the original is untouched."""
    randomize_batch_norm(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        fused = fuse(model, **fuse_kwargs)
        out = fused(x)
    assert _convs(fused, x) == convs_left
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= RTOL
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return fused


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return factory()


@pytest.mark.parametrize(
    ("factory", "channels"),
    [
        pytest.param(lambda: RepVGGBlock(8, 8), 8, id="repvgg"),
        pytest.param(lambda: RepVGGBlock(8, 8, groups=2), 8, id="repvgg-groups2"),
        pytest.param(lambda: RepVGGBlock(8, 8, groups=8), 8, id="repvgg-depthwise"),
        pytest.param(lambda: RepVGGBlock(4, 8, stride=2), 4, id="repvgg-stride2-no-identity"),
        pytest.param(lambda: MobileOneBlock(8, 8, 3, branches=4), 8, id="mobileone-k4"),
        pytest.param(lambda: MobileOneBlock(8, 8, 5, groups=8, branches=3), 8, id="mobileone-depthwise-5x5"),
        pytest.param(lambda: MobileOneBlock(8, 16, 1, branches=2), 8, id="mobileone-pointwise"),
    ],
)
def test_merge_branches_block_becomes_one_conv(factory: Callable[[], nn.Module], channels: int) -> None:
    fused = _check(_seeded(factory), torch.randn(2, channels, 9, 9), convs_left=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert len(fused.fusion_report.merged) == 1


def test_merge_branches_repvgg_report_lists_consumed_branches() -> None:
    fused = _check(_seeded(lambda: RepVGGBlock(8, 8)), torch.randn(1, 8, 6, 6), convs_left=1)
    report = fused.fusion_report
    (merged,) = report.merged
    assert merged.into == "rbr_dense.conv"
    assert set(merged.consumed) == {"rbr_dense.conv", "rbr_1x1.conv", "rbr_identity"}
    assert merged.rule == "merge_branches"
    assert any(f.bn == "rbr_identity" and f.rule == "merge_branches" for f in report.folded)
    assert report.to_dict()["merged"][0]["consumed"] == list(merged.consumed)
    assert "<- merged" in str(report)
    assert report.skipped == []


class _TwoConvs(nn.Module):
    def __init__(self, a: nn.Conv2d, b: nn.Conv2d) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


def test_merge_branches_skips_different_stride() -> None:
    # On a 5x5 input both give 3x3 outputs, but they read different windows.
    model = _TwoConvs(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=1, padding=0))
    fused = _check(model, torch.randn(2, 4, 5, 5), convs_left=2)
    assert fused.fusion_report.merged == []


def test_merge_branches_skips_different_dilation() -> None:
    model = _TwoConvs(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    _check(model, torch.randn(2, 4, 7, 7), convs_left=2)


def test_merge_branches_skips_misaligned_padding() -> None:
    # Same output size, but the 1x1 reads the window's corner, not its centre: not a padded 3x3 kernel.
    class Corner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x) + self.b(x)[:, :, :-2, :-2]

    _check(Corner(), torch.randn(2, 4, 6, 6), convs_left=2)


def test_merge_branches_skips_different_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x) + self.b(torch.relu(x))

    _check(TwoInputs(), torch.randn(2, 4, 6, 6), convs_left=2)


class _ReadElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.a(x)
        return (a + self.b(x) + self.c(x)) * torch.sigmoid(a)


def test_merge_branches_skips_branch_read_elsewhere() -> None:
    # ``a`` is read by the sigmoid too: it stays; the two other branches still merge.
    fused = _check(_ReadElsewhere(), torch.randn(2, 4, 6, 6), convs_left=2)
    (merged,) = fused.fusion_report.merged
    assert set(merged.consumed) == {"b.0", "c"}


def test_merge_branches_skips_conv_with_hooks() -> None:
    model = _TwoConvs(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    model.b.register_forward_hook(lambda *args: None)
    _check(model, torch.randn(2, 4, 6, 6), convs_left=2)


class _PoolBranch(nn.Module):
    def __init__(self, count_include_pad: bool = True, bn_after_pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)
        self.pool_bn = nn.BatchNorm2d(6) if bn_after_pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.pool_bn(self.pool(x))


def test_merge_branches_average_pool_branch() -> None:
    fused = _check(_PoolBranch(), torch.randn(2, 6, 7, 7), convs_left=1)
    assert count_kernels(fused, torch.randn(1, 6, 7, 7), keyword="avg_pool") == 0


def test_merge_branches_average_pool_then_batch_norm_branch() -> None:
    _check(_PoolBranch(bn_after_pool=True), torch.randn(2, 6, 7, 7), convs_left=1)


def test_merge_branches_skips_pool_excluding_padding() -> None:
    # count_include_pad=False divides border windows by fewer elements: no single kernel does that.
    fused = _check(_PoolBranch(count_include_pad=False), torch.randn(2, 6, 7, 7), convs_left=1)
    assert count_kernels(fused, torch.randn(1, 6, 7, 7), keyword="avg_pool") == 1
    assert fused.fusion_report.merged == []


def test_merge_branches_asymmetric_kernels() -> None:
    class ACBlock(nn.Module):  # ACNet: square, horizontal and vertical kernels
        def __init__(self) -> None:
            super().__init__()
            self.square = nn.Conv2d(4, 6, 3, padding=1)
            self.hor = nn.Sequential(nn.Conv2d(4, 6, (1, 3), padding=(0, 1)), nn.BatchNorm2d(6))
            self.ver = nn.Sequential(nn.Conv2d(4, 6, (3, 1), padding=(1, 0)), nn.BatchNorm2d(6))

        def forward(self, x: Tensor) -> Tensor:
            return self.square(x) + self.hor(x) + self.ver(x)

    _check(ACBlock(), torch.randn(2, 4, 5, 8), convs_left=1)


def test_merge_branches_subtraction_alpha_and_constant() -> None:
    class Signed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return 0.5 + torch.add(self.a(x) - self.b(x), self.c(x), alpha=-2.0) - x

    fused = _check(Signed(), torch.randn(2, 4, 6, 6), convs_left=1)
    (merged,) = fused.fusion_report.merged
    assert "constant 0.5" in merged.consumed
    assert "-2 * c" in merged.consumed


def test_merge_branches_keeps_other_summands() -> None:
    class WithResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return self.a(x) + torch.tanh(y) + self.b(x)

    model = WithResidual().eval()
    x, y = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x, y)
        fused = fuse(model)
        out = fused(x, y)
    assert count_kernels(fused, x, y, keyword="convolution") == 1
    assert rel_err(out, ref) <= RTOL


@pytest.mark.parametrize("dims", [1, 3])
def test_merge_branches_conv1d_and_conv3d(dims: int) -> None:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(conv(4, 4, 3, padding=1, bias=False), bn(4))
            self.b = nn.Sequential(conv(4, 4, 1, bias=False), bn(4))
            self.skip = bn(4)

        def forward(self, x: Tensor) -> Tensor:
            return F.relu(self.a(x) + self.b(x) + self.skip(x))

    x = torch.randn(2, 4, *([5] * dims))
    _check(Block(), x, convs_left=1, example_inputs=(x,))  # BatchNorm1d leaves the rank open without inputs


def test_merge_branches_functional_batch_norm_identity() -> None:
    class FunctionalSkip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.skip = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            s = self.skip
            return self.conv(x) + F.batch_norm(x, s.running_mean, s.running_var, s.weight, s.bias, False, 0.1, s.eps)

    _check(FunctionalSkip(), torch.randn(2, 4, 6, 6), convs_left=1)


def _graph_with(target: Callable[..., object], first_is_input: bool) -> fx.GraphModule:
    """``target(conv(x), conv1x1(x))`` or ``target(x, conv(x))`` as a hand-built graph (fx traces ``+=`` as add)."""
    root = nn.Module()
    root.a, root.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_module("a", (x,))
    b = graph.call_module("b", (x,))
    out = graph.call_function(target, (x, a) if first_is_input else (a, b))
    graph.output(out)
    return fx.GraphModule(root, graph)


def test_merge_branches_in_place_add_of_fresh_output() -> None:
    gm = _graph_with(operator.iadd, first_is_input=False)
    x = torch.randn(2, 4, 5, 5)
    ref = gm(x)
    result = merge_branches(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert isinstance(result, PassChanges)
    assert len(result.merged) == 1
    assert _convs(gm, x) == 1
    assert rel_err(gm(x), ref) <= RTOL


def test_merge_branches_skips_in_place_add_into_input() -> None:
    # ``x += conv(x)`` writes into the caller's tensor; an out-of-place merged conv would not.
    gm = _graph_with(operator.iadd, first_is_input=True)
    assert merge_branches(gm).merged == []


def test_merge_branches_channels_last_and_original_untouched() -> None:
    model = _seeded(lambda: RepVGGBlock(8, 8)).to(memory_format=torch.channels_last)
    fused = _check(model, torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last), convs_left=1)
    assert fused.rbr_dense.conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "factory", [pytest.param(repvgg_net, id="repvgg"), pytest.param(mobileone_net, id="mobileone")]
)
def test_merge_branches_network_matches_hand_written_deploy_form(factory: Callable[[], nn.Module]) -> None:
    model = randomize_batch_norm(_seeded(factory)).eval()
    deploy = model.deploy()
    x = torch.randn(2, 3, 32, 32)
    fused = _check(model, x, convs_left=_convs(deploy, x))
    assert _convs(fused, x) < _convs(model, x)
    with torch.no_grad():
        assert rel_err(fused(x), deploy(x)) <= RTOL
    assert fused.fusion_report.skipped == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "factory", [pytest.param(repvgg_net, id="repvgg"), pytest.param(mobileone_net, id="mobileone")]
)
def test_merge_branches_half_precision_error_stays_at_model_error(
    factory: Callable[[], nn.Module], dtype: torch.dtype
) -> None:
    model = randomize_batch_norm(_seeded(factory)).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        reference = model.double().blocks(x.double())
        low = model.to(dtype).blocks
        fused = fuse(low)
        # Norm-wise relative error over whole feature maps: a stable statistic, unlike a few logits' maximum.
        unfused_err = float((low(x.to(dtype)).double() - reference).norm() / reference.norm())
        fused_err = float((fused(x.to(dtype)).double() - reference).norm() / reference.norm())
    assert _convs(fused, x.to(dtype)) == _convs(model.float().deploy().blocks, x)
    assert next(fused.parameters()).dtype == dtype
    # Reference: the unfused low-precision model's own error against float64; allow 1.5x of it, as BN folding does.
    assert fused_err <= 1.5 * unfused_err, (fused_err, unfused_err)


def test_merge_branches_skips_merge_that_overflows_dtype() -> None:
    # Weight 6e4 and variance 0.25 fit in float16, but the identity kernel's scale 1.2e5 does not.
    block = RepVGGBlock(4, 4)
    with torch.no_grad():
        block.rbr_identity.weight.fill_(6e4)
        block.rbr_identity.running_var.fill_(0.25)
    block = block.half().eval()
    assert torch.isfinite(block.rbr_identity.weight).all()
    with torch.no_grad():
        fused = fuse(block)
    assert [set(m.consumed) for m in fused.fusion_report.merged] == []
    assert count_kernels(fused, torch.randn(1, 4, 5, 5).half(), keyword="convolution") == 2


class _AssertedBranches(nn.Module):
    """Branches whose outputs are also checked for rank, as timm's ``BatchNormAct2d`` does before normalising."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.pointwise = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.identity = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        a = self.dense[0](x)
        torch._assert(a.ndim == 4, "expected 4-D")
        b = self.pointwise[0](x)
        torch._assert(b.shape[1] == 4, "expected 4 channels")
        return torch.relu(self.dense[1](a) + self.pointwise[1](b) + self.identity(x))


def test_merge_branches_moves_shape_checks_to_the_merged_conv() -> None:
    fused = _check(_AssertedBranches(), torch.randn(2, 4, 6, 6), convs_left=1)
    (merged,) = fused.fusion_report.merged
    assert set(merged.consumed) == {"dense.0", "pointwise.0", "identity"}
    fused.graph.lint()
    (conv,) = [n for n in fused.graph.nodes if n.op == "call_module"]
    # Both checks now read the merged convolution, which runs before them; nothing else is left.
    assert sorted((u.target.__name__, u.args[1:]) for u in conv.users) == [
        ("getattr", ("ndim",)),
        ("getattr", ("shape",)),
        ("relu", ()),
    ]

"""fold_bn_into_preceding: structure (what was folded) and numbers (same output as the eval model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from engine_nets import BatchNormAct2d, ConvNormAct, batch_norm_count
from fx_lightning import count_kernels, fuse
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err

BN_PASSES = ["remove_dropout", "fold_bn_into_preceding", "fold_bn_into_following"]


def _fused_and_error(model: nn.Module, x: torch.Tensor, **kwargs: object) -> tuple[nn.Module, float]:
    randomize_batch_norm(model)
    model.eval()
    kwargs.setdefault("example_inputs", (x,))  # settles the ranks that BatchNorm1d, SyncBatchNorm, ... leave open
    fused = fuse(model, **kwargs)
    with torch.no_grad():
        return fused, rel_err(fused(x), model(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_bn_into_preceding_conv(dims: int, bias: bool) -> None:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, 6, 3, padding=1, bias=bias)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](6)
    x = torch.randn(2, 3, *([5] * dims))
    fused, err = _fused_and_error(nn.Sequential(conv, bn), x)
    assert err <= 1e-5
    assert batch_norm_count(fused) == 0
    assert [(r.bn, r.into, r.rule) for r in fused.fusion_report.folded] == [("1", "0", "fold_bn_into_preceding")]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 4, 1), (4, 4, 2), (4, 4, 4), (6, 4, 2)])
def test_fold_bn_into_preceding_conv_transpose_grouped(dims: int, cin: int, cout: int, groups: int) -> None:
    conv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1](cin, cout, 3, 2, groups=groups)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](cout)
    fused, err = _fused_and_error(nn.Sequential(conv, bn), torch.randn(2, cin, *([4] * dims)))
    assert err <= 1e-5
    assert batch_norm_count(fused) == 0


class Head(nn.Module):
    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = torch.flatten(x, 1)
        return self.bn(self.fc(x))


def test_fold_bn_into_preceding_linear_on_flattened_input() -> None:
    fused, err = _fused_and_error(Head(flatten=True), torch.randn(4, 8))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1


def test_fold_bn_into_preceding_linear_with_example_inputs() -> None:
    x = torch.randn(4, 8)
    fused, err = _fused_and_error(Head(flatten=False), x, example_inputs=(x,))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1


def test_fold_bn_into_preceding_skips_linear_of_unknown_rank() -> None:
    fused, err = _fused_and_error(Head(flatten=False), torch.randn(4, 8), example_inputs=None)
    assert err <= 1e-5
    [skipped] = fused.fusion_report.skipped
    assert skipped.bn == "bn"
    assert "rank is unknown" in skipped.reason


def test_fold_bn_into_preceding_skips_linear_on_3d_input() -> None:
    # BatchNorm1d on (N, C, L) normalises C, while the Linear maps L: folding would be wrong.
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    x = torch.randn(4, 6, 6)
    fused, err = _fused_and_error(model, x, example_inputs=(x,))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 0
    assert "3-D" in fused.fusion_report.skipped[0].reason


@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_into_preceding_linear_bn_without_affine(affine: bool) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5, affine=affine))
    fused, err = _fused_and_error(model, torch.randn(4, 2, 4))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1


def test_fold_bn_into_preceding_functional_batch_norm_subclass_keeps_activation() -> None:
    fused, err = _fused_and_error(ConvNormAct(3, 8), torch.randn(2, 3, 8, 8))
    assert err <= 1e-5
    assert [r.bn for r in fused.fusion_report.folded] == ["bn"]
    assert count_kernels(fused, torch.randn(1, 3, 8, 8)) == 0
    # The block keeps its class; its BatchNorm-plus-activation child keeps the activation, without the BatchNorm.
    assert type(fused) is ConvNormAct
    assert "act" in fused.bn.code
    assert fused.fusion_report.graphs == ["bn"]


class FrozenBN(nn.BatchNorm2d):
    """A subclass that keeps torch's forward but overrides the input check (untraceable in itself)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError("4-D input expected")


@pytest.mark.parametrize(
    "bn_factory",
    [
        pytest.param(lambda: FrozenBN(6), id="subclass"),
        pytest.param(lambda: nn.SyncBatchNorm(6), id="sync"),
        pytest.param(lambda: BatchNormAct2d(6, act=False), id="functional"),
    ],
)
def test_fold_bn_into_preceding_batch_norm_variants(bn_factory: object) -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn_factory())
    fused, err = _fused_and_error(model, torch.randn(2, 3, 6, 6))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1
    assert count_kernels(fused, torch.randn(1, 3, 6, 6)) == 0


def test_fold_bn_into_preceding_lazy_batch_norm_once_materialised() -> None:
    model = nn.Sequential(nn.LazyConv2d(6, 3), nn.LazyBatchNorm2d())
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materialise
    fused, err = _fused_and_error(model, x)
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1


def test_fold_bn_into_preceding_skips_unmaterialised_lazy_batch_norm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.LazyBatchNorm2d())
    fused = fuse(model)
    assert fused.fusion_report.num_folded == 0
    assert "not materialised" in fused.fusion_report.skipped[0].reason


def test_fold_bn_into_preceding_buffers_kept_after_track_running_stats_off() -> None:
    # Lightning's BaseFinetuning.freeze sets track_running_stats=False; eval still uses the buffers.
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    model[1].track_running_stats = False
    fused, err = _fused_and_error(model, torch.randn(2, 3, 6, 6))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1


def test_fold_bn_into_preceding_skips_batch_norm_without_running_stats() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False))
    fused, err = _fused_and_error(model, torch.randn(4, 3, 6, 6))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 0
    assert "batch statistics" in fused.fusion_report.skipped[0].reason


class TwoSites(nn.Module):
    """One conv called twice, only one call followed by BatchNorm (pytorch/pytorch#104593)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


def test_fold_bn_into_preceding_conv_called_at_two_sites() -> None:
    # Only the BatchNorm passes: branch merging would otherwise merge the two calls into one conv.
    fused, err = _fused_and_error(TwoSites(), torch.randn(2, 4, 5, 5), passes=BN_PASSES)
    assert err <= 1e-5
    [folded] = fused.fusion_report.folded
    assert folded.into == "conv_folded1"
    assert isinstance(fused.conv, nn.Conv2d)
    assert isinstance(fused.conv_folded1, nn.Conv2d)


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) * y


def test_fold_bn_into_preceding_skips_shared_output() -> None:
    fused, err = _fused_and_error(SharedOutput(), torch.randn(2, 4, 5, 5))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 0
    assert "also read by mul" in fused.fusion_report.skipped[0].reason


class SharedBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_fold_bn_into_preceding_one_batch_norm_after_two_convs() -> None:
    fused, err = _fused_and_error(SharedBatchNorm(), torch.randn(2, 4, 5, 5))
    assert err <= 1e-5
    assert sorted(r.into for r in fused.fusion_report.folded) == ["a", "b"]
    assert batch_norm_count(fused) == 0


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


def test_fold_bn_into_preceding_tied_weights() -> None:
    model = Tied()
    fused, err = _fused_and_error(model, torch.randn(2, 4, 5, 5))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1
    assert model.a.weight is model.b.weight  # the caller's tie is intact


class Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2.0


def test_fold_bn_into_preceding_parametrized_weight() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    parametrize.register_parametrization(model[0], "weight", Scale())
    fused, err = _fused_and_error(model, torch.randn(2, 3, 6, 6))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1
    assert not parametrize.is_parametrized(getattr(fused, "0"))
    assert parametrize.is_parametrized(model[0])


def test_fold_bn_into_preceding_skips_layer_with_forward_hook() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    fused, err = _fused_and_error(model, torch.randn(2, 3, 6, 6))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 0
    assert "forward hooks" in fused.fusion_report.skipped[0].reason


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_bn_into_preceding_low_precision_error_stays_at_model_error(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())])
    randomize_batch_norm(model).eval()
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        reference = model.double()(x.double())
        low = model.to(dtype)
        fused = fuse(low)
        unfused_err = rel_err(low(x.to(dtype)), reference)
        fused_err = rel_err(fused(x.to(dtype)), reference)
    assert fused.fusion_report.num_folded == 3
    assert next(fused.parameters()).dtype == dtype
    # Reference: the unfused low-precision model's own error against float64; allow 1.5x of it.
    assert fused_err <= 1.5 * unfused_err, (fused_err, unfused_err)


def test_fold_bn_into_preceding_torchvision_frozen_batch_norm() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(6)
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 1.5)
        frozen.bias.normal_()
        frozen.running_mean.normal_()
        frozen.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), frozen).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = fuse(model, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5
    assert fused.fusion_report.num_folded == 1
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    # FrozenBatchNorm2d accepts a 3-D (unbatched) conv output too: without example inputs the rank is unknown.
    [skipped] = fuse(model).fusion_report.skipped
    assert "rank of '0' output is unknown" in skipped.reason


class FunctionalConv(nn.Module):
    """A convolution written with ``F.conv*``/``F.conv_transpose*`` on its own parameters."""

    def __init__(self, dims: int, cin: int, cout: int, *, bias: bool, groups: int, transposed: bool) -> None:
        super().__init__()
        shape = (cin, cout // groups) if transposed else (cout, cin // groups)
        self.weight = nn.Parameter(torch.randn(*shape, *([3] * dims)) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout)) if bias else None
        self.groups = groups
        self.fn = getattr(torch.nn.functional, f"conv_transpose{dims}d" if transposed else f"conv{dims}d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:  # bias passed by keyword, groups by keyword
            return self.fn(x, self.weight, padding=1, groups=self.groups)
        return self.fn(x, self.weight, self.bias, 1, 1, groups=self.groups)


def _norm(dims: int, channels: int) -> nn.Module:
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](channels)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("bias", "groups"), [(True, 1), (False, 1), (True, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_bn_into_preceding_functional_conv(dims: int, bias: bool, groups: int, transposed: bool) -> None:
    model = nn.Sequential(FunctionalConv(dims, 4, 6, bias=bias, groups=groups, transposed=transposed), _norm(dims, 6))
    before = {k: v.clone() for k, v in model[0].state_dict().items()}
    fused, err = _fused_and_error(model, torch.randn(2, 4, *([5] * dims)))
    assert err <= 1e-5
    assert batch_norm_count(fused) == 0
    assert [(r.bn, r.into) for r in fused.fusion_report.folded] == [("1", "0.weight_folded1")]
    # The call's old parameters are read by nothing else, so the fused module drops them.
    assert sorted(fused.state_dict()) == ["0.weight_folded1", "0.weight_folded1_bias"]
    after = model[0].state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the caller's layer is untouched


class FunctionalHead(nn.Module):
    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.w = nn.Parameter(torch.randn(5, 8))
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = torch.flatten(x, 1)
        return self.bn(torch.nn.functional.linear(x, self.w))


def test_fold_bn_into_preceding_functional_linear() -> None:
    fused, err = _fused_and_error(FunctionalHead(flatten=True), torch.randn(4, 8))
    assert err <= 1e-5
    assert [r.into for r in fused.fusion_report.folded] == ["w_folded1"]
    fused, err = _fused_and_error(FunctionalHead(flatten=False), torch.randn(4, 8), example_inputs=None)
    assert err <= 1e-5
    [skipped] = fused.fusion_report.skipped
    assert "'linear' output rank is unknown" in skipped.reason


class SharedFunctionalWeight(nn.Module):
    """One weight convolved twice; only the first call is followed by BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.nn.functional.conv2d(x, self.weight, padding=1))
        return torch.nn.functional.conv2d(y, self.weight, padding=1)


def test_fold_bn_into_preceding_functional_shared_weight_kept_for_other_call() -> None:
    model = SharedFunctionalWeight()
    fused, err = _fused_and_error(model, torch.randn(2, 4, 6, 6))
    assert err <= 1e-5
    assert fused.fusion_report.num_folded == 1
    assert sorted(fused.state_dict()) == ["weight", "weight_folded1", "weight_folded1_bias"]
    assert fused.weight.data_ptr() == model.weight.data_ptr()  # still shared with the caller, untouched


class StandardisedConv(nn.Module):
    """Weight standardisation: the weight the convolution uses is computed in the graph, so it cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self.bn(torch.nn.functional.conv2d(x, w))


def test_fold_bn_into_preceding_skips_functional_conv_on_computed_weight() -> None:
    fused, err = _fused_and_error(StandardisedConv(), torch.randn(2, 3, 6, 6))
    assert err <= 1e-5
    [skipped] = fused.fusion_report.skipped
    assert skipped.bn == "bn"
    assert "the weight or bias of 'conv2d' is computed in the graph (%sub" in skipped.reason


class FunctionalConvReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x, self.weight)
        return self.bn(y) + y


def test_fold_bn_into_preceding_skips_functional_conv_read_elsewhere() -> None:
    fused, err = _fused_and_error(FunctionalConvReadTwice(), torch.randn(2, 4, 3, 3))
    assert err <= 1e-5
    [skipped] = fused.fusion_report.skipped
    assert "the output of 'conv2d' is also read by add" in skipped.reason


class LinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: BatchNorm1d over the rows of a flattened (batch, tokens, features) output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_fold_bn_into_preceding_linear_through_flattened_rows_with_example_inputs() -> None:
    x = torch.randn(2, 5, 6)
    fused, err = _fused_and_error(LinearNorm(), x, example_inputs=(x,))
    assert err <= 1e-5
    assert [(r.bn, r.into) for r in fused.fusion_report.folded] == [("bn", "linear")]
    assert batch_norm_count(fused) == 0


@pytest.mark.parametrize(
    ("shape", "why"), [((2, 5, 6), "output rank is unknown"), ((2, 3, 8, 6), "output rank is 4-D")]
)
def test_fold_bn_into_preceding_skips_flattened_rows_of_unknown_or_other_rank(shape: tuple[int, ...], why: str) -> None:
    x = torch.randn(*shape)
    # (2, 3, 8, 6) -> Linear -> (2, 3, 8, 8) -> flatten(0, 1) -> (6, 8, 8): BatchNorm1d(8) would normalise the
    # 8 rows of dim 1, not the features, though the sizes match. Folding it per feature would be wrong.
    model = LinearNorm()
    kwargs = {"example_inputs": (x,) if len(shape) == 4 else None}
    fused, err = _fused_and_error(model, x, **kwargs)
    assert err <= 1e-5
    [skipped] = fused.fusion_report.skipped
    assert why in skipped.reason


class MixedConv(nn.Module):
    """timm MixNet's ``MixedConv2d``: channel groups convolved with different kernels, concatenated, normalised."""

    def __init__(self, parts: str = "convs", dim: int = 1) -> None:
        super().__init__()
        self.parts, self.dim = parts, dim
        self.convs = nn.ModuleList(nn.Conv2d(2, c, k, padding=k // 2) for c, k in ((3, 3), (2, 5), (1, 1)))
        self.bn = nn.BatchNorm2d(6 if dim == 1 else 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.split(x, 2, dim=1)
        outs = [self.convs[i](xs[i]) for i in range(3)]
        if self.parts == "with_input":
            outs[2] = xs[2][:, :1]  # not a layer output: cannot carry its share of the BatchNorm
        elif self.parts == "repeated":
            outs = [outs[0], outs[0]]
        if self.dim != 1:
            outs = [outs[0], outs[0] * 2]
        return self.bn(torch.cat(outs, self.dim))


def test_fold_bn_into_preceding_splits_batch_norm_over_concatenated_convs() -> None:
    fused, err = _fused_and_error(MixedConv(), torch.randn(2, 6, 7, 7))
    assert err <= 1e-5
    assert batch_norm_count(fused) == 0
    assert [(r.bn, r.into) for r in fused.fusion_report.folded] == [("bn", "convs.0, convs.1, convs.2")]


@pytest.mark.parametrize(
    ("parts", "dim", "why"),
    [
        ("with_input", 1, "its input is a concatenation ('cat') whose part 'getitem_4' is not a Conv"),
        ("repeated", 1, "its input is a concatenation ('cat') of repeated or non-tensor parts"),
        ("convs", 2, "its input is not a Conv/ConvTranspose/Linear layer call ('cat': call_function cat)"),
    ],
)
def test_fold_bn_into_preceding_skips_other_concatenations(parts: str, dim: int, why: str) -> None:
    model = MixedConv(parts, dim)
    if parts == "repeated":
        model.bn = nn.BatchNorm2d(6)
    fused, err = _fused_and_error(model, torch.randn(2, 6, 7, 7))
    assert err <= 1e-5
    [skipped] = fused.fusion_report.skipped
    assert why in skipped.reason

"""Rules read from source: pad-then-convolve conv subclasses, helpers that read only settings, chained children.

Folds into the convolutions it proves are compared with a float64 copy of the original network, relative to the
output's scale (``rel_err``): float32 folding rounds a few times, so the tolerance is 1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fx_lightning import fuse
from fx_lightning.fusion.padded_conv import chained_children, padded_conv_family, parsed_source, reads_only_settings
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err

TOLERANCE = 1e-5


def conv2d_same(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """timm's ``conv2d_same`` in small: pad from the input's and the weight's shapes, then convolve."""
    size, kernel = x.shape[-1], weight.shape[-1]
    total = max((math.ceil(size / stride[0]) - 1) * stride[0] + kernel - size, 0)
    x = F.pad(x, [total // 2, total - total // 2] * 2)
    return F.conv2d(x, weight, bias, stride)


def _reads_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x * weight.mean(), weight, bias)


class FunctionalPad(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride)


class AssignThenReturn(nn.Conv2d):
    """``y = F.conv2d(...)`` then ``return y``, with a docstring first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad right and bottom."""
        padded = F.pad(x, [0, self.weight.shape[-1] - 1, 0, self.weight.size(-2) - 1])
        y = F.conv2d(padded, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y  # noqa: RET504 - the form under test


class ConvForwardCall(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, [1, 1, 1, 1]), self.weight, self.bias)


class ThroughHelper(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.weight, self.bias, self.stride)


class ThroughValueReadingHelper(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _reads_weight(x, self.weight, self.bias)


class PaddedConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(F.pad(x, [2, 0]), self.weight, self.bias)


class PaddedConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, [0, 1] * 3))


class AlsoOverridesConvForward(FunctionalPad):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, weight * 2, bias)


class WeightProperty(nn.Conv2d):
    """A weight computed on access: a fold written to it would be lost."""

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.raw * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


class TwoInputs(nn.Conv2d):
    def forward(self, x: torch.Tensor, pad: int) -> torch.Tensor:  # type: ignore[override]
        return F.conv2d(F.pad(x, [pad] * 4), self.weight, self.bias)


class WritesToSelf(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_size = x.shape[-1]
        return F.conv2d(x, self.weight, self.bias)


class DropsTheBias(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [1] * 4), self.weight, None)


class EarlyReturn(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 100:
            return x
        return F.conv2d(x, self.weight, self.bias)


@pytest.mark.parametrize(
    ("module", "family"),
    [
        (FunctionalPad(2, 3, 3), nn.Conv2d),
        (AssignThenReturn(2, 3, 3), nn.Conv2d),
        (ConvForwardCall(2, 3, 3), nn.Conv2d),
        (ThroughHelper(2, 3, 3, stride=2), nn.Conv2d),
        (PaddedConv1d(2, 3, 3), nn.Conv1d),
        (PaddedConv3d(2, 3, 3), nn.Conv3d),
    ],
)
def test_padded_conv_family_proves_pad_then_convolve(module: nn.Module, family: type[nn.Module]) -> None:
    assert padded_conv_family(module) is family


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(2, 3, 3),  # torch's own class: not a subclass that pads
        nn.ConvTranspose2d(2, 3, 3),
        nn.Linear(2, 3),
        AlsoOverridesConvForward(2, 3, 3),
        TwoInputs(2, 3, 3),
        WritesToSelf(2, 3, 3),
        DropsTheBias(2, 3, 3),
        EarlyReturn(2, 3, 3),
        ThroughValueReadingHelper(2, 3, 3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_padded_conv_family_refuses_what_it_cannot_prove(module: nn.Module) -> None:
    assert padded_conv_family(module) is None


def test_padded_conv_family_refuses_a_weight_property() -> None:
    assert padded_conv_family(WeightProperty.__new__(WeightProperty)) is None


def test_padded_conv_family_refuses_a_parametrized_weight() -> None:
    conv = FunctionalPad(2, 3, 3)
    assert padded_conv_family(conv) is nn.Conv2d
    parametrize.register_parametrization(conv, "weight", nn.Identity())
    assert padded_conv_family(conv) is None


def test_padded_conv_family_refuses_a_class_without_source() -> None:
    namespace: dict = {"nn": nn, "F": F}
    exec(  # noqa: S102 - a class whose source inspect cannot read
        "class NoSource(nn.Conv2d):\n    def forward(self, x):\n        return F.conv2d(x, self.weight, self.bias)\n",
        namespace,
    )
    assert padded_conv_family(namespace["NoSource"](2, 3, 3)) is None


def _float64_error(fused: nn.Module, original: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return rel_err(fused(x), copy.deepcopy(original).double()(x.double()))


@pytest.mark.parametrize(
    ("conv", "norm", "shape"),
    [
        (FunctionalPad(3, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 3, 9, 9)),
        (AssignThenReturn(3, 6, 3, groups=3), nn.BatchNorm2d(6), (2, 3, 8, 8)),
        (ConvForwardCall(3, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 3, 7, 7)),
        (ThroughHelper(3, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 3, 10, 10)),
        (PaddedConv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 11)),
        (PaddedConv3d(3, 6, 3), nn.BatchNorm3d(6), (2, 3, 5, 5, 5)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_fold_into_padded_conv_matches_float64_reference(conv: nn.Module, norm: nn.Module, shape: tuple) -> None:
    torch.manual_seed(0)
    original = randomize_batch_norm(nn.Sequential(conv, norm, nn.ReLU())).eval()
    x = torch.randn(shape)
    own = _float64_error(original, original, x)  # float32 rounding of the unfused network itself
    # BatchNorm1d takes (N, C) and (N, C, L): without example inputs the rank is unknown and it is left.
    for example in ((x,),) if isinstance(norm, nn.BatchNorm1d) else (None, (x,)):
        fused = fuse(original, example_inputs=example)
        assert fused.fusion_report.num_folded == 1, fused.fusion_report
        assert [type(m) for m in fused] == [type(conv), nn.Identity, nn.ReLU]  # the user's class is kept
        assert _float64_error(fused, original, x) <= max(2 * own, TOLERANCE)
    assert type(original[1]) is type(norm)  # the caller's network is left as it was


def test_fold_into_padded_conv_is_exact_for_any_input_size() -> None:
    # The padding depends on the input's size; the fold must not: one fused network, three sizes.
    torch.manual_seed(0)
    original = randomize_batch_norm(nn.Sequential(ThroughHelper(3, 4, 3, stride=2), nn.BatchNorm2d(4))).eval()
    fused = fuse(original)
    assert fused.fusion_report.num_folded == 1
    for size in (5, 8, 13):
        assert _float64_error(fused, original, torch.randn(2, 3, size, size)) <= TOLERANCE


def test_fold_beside_a_conv_that_reads_its_weight_values_is_not_in_place() -> None:
    # Not proven: a fold may only happen in generated code that keeps the weight read before the convolution.
    torch.manual_seed(0)
    original = randomize_batch_norm(nn.Sequential(ThroughValueReadingHelper(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    for example in (None, (x,)):
        fused = fuse(original, example_inputs=example)
        assert not any(r.in_place for r in fused.fusion_report.folded)
        # the forward reads the weight's values, so the weight at the user's path keeps them
        assert torch.equal(fused.get_submodule("0").weight, original[0].weight)
        assert _float64_error(fused, original, x) <= TOLERANCE


def test_parsed_source_reads_each_function_once() -> None:
    def local(x: int) -> int:
        return x + 1

    first = parsed_source(local)
    hits = parsed_source.cache_info().hits
    assert parsed_source(local) is first  # the same tree, shared
    assert parsed_source.cache_info().hits == hits + 1
    assert first is not None
    assert first.body[0].name == "local"


def test_parsed_source_distinguishes_functions_with_the_same_source() -> None:
    def make():  # noqa: ANN202
        def twin(x: int) -> int:
            return x

        return twin

    a, b = make(), make()
    assert a is not b
    assert parsed_source(a) is not parsed_source(b)


def test_parsed_source_is_none_without_source() -> None:
    namespace: dict = {}
    exec("def generated(x):\n    return x\n", namespace)  # noqa: S102
    assert parsed_source(namespace["generated"]) is None
    assert parsed_source(len) is None
    assert parsed_source(42) is None


def pad_for(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.pad(x, [conv.kernel_size[0] // 2, conv.stride[0] - 1] * 2)


def calls_a_setting(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.pad(x, [conv.padding()] * 4)


def rebinds(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    conv = nn.Identity()
    return conv(x)


def passes_it_on(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return pad_for(x, conv)


@pytest.mark.parametrize(
    ("function", "expected"),
    [(pad_for, True), (calls_a_setting, False), (rebinds, False), (passes_it_on, False), (len, False)],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_reads_only_settings(function: object, expected: bool) -> None:
    assert reads_only_settings(function, "conv") is expected


class Nested(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


class Rebound(nn.Module):
    def forward(self, x: torch.Tensor, flag: bool = False) -> torch.Tensor:
        h = self.conv(x)
        h = self.bn(h)
        return h if flag else h.relu()


class ConvUsedTwice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class ConvReadElsewhere(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def describe(self) -> str:
        return str(self.conv)


class ReachesChildren(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return self.bn(self.conv(x))


class NotConsecutive(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        y = h * 2
        h = self.bn(h)
        return h + y


@pytest.mark.parametrize(
    ("cls", "pairs"),
    [
        (Nested, (("conv", "bn"),)),
        (Rebound, (("conv", "bn"),)),
        (ConvUsedTwice, ()),
        (ConvReadElsewhere, ()),
        (ReachesChildren, ()),
        (NotConsecutive, ()),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_chained_children(cls: type, pairs: tuple) -> None:
    assert chained_children(cls) == pairs

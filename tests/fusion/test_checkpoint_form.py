"""The checkpoint form: ``checkpoint_plan`` and ``checkpoint_state_dict`` in the original's layout.

A fresh instance of the original class loaded with the checkpoint form is compared with the fused network and with
a float64 copy of the original, relative to the output's scale (``rel_err``): float32 folding rounds a few times,
so the tolerance is 1e-5.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from fx_lightning import CheckpointFold, checkpoint_plan, checkpoint_state_dict, fuse
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err

TOLERANCE = 1e-5


def _prepared(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batch_norm(factory(), seed).eval()


def _fresh(factory: Callable[[], nn.Module], state: dict[str, Tensor]) -> nn.Module:
    torch.manual_seed(123)  # other values than the original's, so that only the state dict can make them agree
    fresh = factory()
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def _assert_reproduces(factory: Callable[[], nn.Module], x: Tensor) -> tuple[nn.Module, nn.Module, dict[str, Tensor]]:
    """Fuse a randomised ``factory()``; check its checkpoint form in a fresh instance. Returns the three."""
    original = _prepared(factory)
    fused = fuse(original, example_inputs=(x,))
    state = checkpoint_state_dict(original, fused)
    fresh = _fresh(factory, state)
    with torch.no_grad():
        out = fresh(x)
        assert rel_err(out, fused(x)) <= TOLERANCE
        assert rel_err(out, copy.deepcopy(original).double()(x.double())) <= TOLERANCE
    return original, fused, state


def conv_bn(bias: bool = False, eps: float = 1e-5) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4, eps=eps), nn.ReLU())


def test_checkpoint_form_docstring_example() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2)).eval()
    state = checkpoint_state_dict(net, fuse(net))
    assert sorted(state) == sorted(net.state_dict())
    assert state["1.weight"].tolist() == [1.0, 1.0]
    assert state["1.running_mean"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0])
def test_checkpoint_form_sets_the_batch_norm_to_the_identity_and_it_carries_the_folded_bias(eps: float) -> None:
    x = torch.randn(2, 3, 6, 6) + 1.0  # away from zero: eps=0 stays finite
    _, fused, state = _assert_reproduces(lambda: conv_bn(eps=eps), x)
    assert torch.equal(state["0.weight"], fused[0].weight.detach())
    assert torch.equal(state["1.weight"], torch.ones(4))
    assert torch.equal(state["1.running_mean"], torch.zeros(4))
    assert torch.equal(state["1.running_var"], torch.full((4,), 1.0 - eps))
    assert torch.equal(state["1.bias"], fused[0].bias.detach())
    assert "0.bias" not in state  # the original's keys only


def test_checkpoint_form_moves_the_layer_bias_into_the_batch_norm() -> None:
    _, fused, state = _assert_reproduces(lambda: conv_bn(bias=True), torch.randn(2, 3, 6, 6))
    assert torch.equal(state["0.bias"], torch.zeros(4))
    assert torch.equal(state["1.bias"], fused[0].bias.detach())


def test_checkpoint_form_of_a_non_affine_batch_norm_puts_the_bias_on_the_layer() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False))

    _, fused, state = _assert_reproduces(factory, torch.randn(3, 5))
    assert torch.equal(state["0.bias"], fused[0].bias.detach())
    assert torch.equal(state["1.running_mean"], torch.zeros(4))


def test_checkpoint_form_of_a_fold_into_the_following_layer() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))

    _, fused, state = _assert_reproduces(factory, torch.randn(2, 3, 5, 5))
    assert [r.rule for r in fused.fusion_report.folded] == ["fold_bn_into_following"]
    assert torch.equal(state["1.weight"], fused[1].weight.detach())
    assert torch.equal(state["1.bias"], fused[1].bias.detach())
    assert torch.equal(state["0.bias"], torch.zeros(3))
    assert torch.equal(state["0.weight"], torch.ones(3))


def test_checkpoint_form_has_the_original_keys_shapes_and_dtypes_as_unshared_copies() -> None:
    original = _prepared(lambda: conv_bn(bias=True)).double()
    fused = fuse(original, example_inputs=(torch.randn(2, 3, 6, 6, dtype=torch.float64),))
    before = {k: v.clone() for k, v in original.state_dict().items()}
    state = checkpoint_state_dict(original, fused)
    reference = original.state_dict()
    assert list(state) == list(reference)
    for key, value in state.items():
        assert type(value) is Tensor, key  # no Parameter objects
        assert not value.requires_grad, key
        assert (value.shape, value.dtype, value.device) == (
            reference[key].shape,
            reference[key].dtype,
            reference[key].device,
        )
    shared = {t.untyped_storage().data_ptr() for t in [*original.state_dict().values(), *fused.state_dict().values()]}
    assert not shared & {t.untyped_storage().data_ptr() for t in state.values()}
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())  # the original is unchanged
    assert state["1.running_mean"].dtype == torch.float64


def test_checkpoint_plan_lists_every_fold_in_the_report_order() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(conv_bn(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    original = _prepared(factory)
    fused = fuse(original, example_inputs=(torch.randn(2, 3, 6, 6),))
    plan = checkpoint_plan(original, fused)
    assert plan == [CheckpointFold(r.bn, r.layers, True) for r in fused.fusion_report.folded]
    assert [p.bn for p in plan] == ["0.1", "2"]
    assert all(p.reason == "" for p in plan)


class ConvTwice(nn.Module):
    """One conv called twice, a BatchNorm after each call: the folds need generated code."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b1, self.b2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b1(self.c(x)) + self.b2(self.c(2 * x))


class TiedHead(nn.Module):
    """A conv whose weight is also a spare module's: writing the folded weight would change the spare too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.spare = nn.Conv2d(3, 3, 1)  # not called by forward, so the fold itself is in place
        self.spare.weight = self.conv.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("factory", "shape", "reason"),
    [
        (ConvTwice, (2, 3, 5, 5), "the fold lives in generated code, not at the model's own module paths"),
        (
            lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, bias=False)),
            (2, 3, 5, 5),
            "'1' has no bias to carry the BatchNorm's shift",
        ),
        (TiedHead, (2, 3, 5, 5), "a tensor of it is tied to another module's, which would take the folded value too"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1.5)),
            (2, 3, 5, 5),
            "'1' has no running statistics and eps in [0, 1) to set to the identity",
        ),
    ],
    ids=["generated-code", "following-without-bias", "tied", "eps-too-large"],
)
def test_checkpoint_plan_keeps_original_values_with_the_reason(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], reason: str
) -> None:
    x = torch.randn(shape)
    original, fused, state = _assert_reproduces(factory, x)
    plan = checkpoint_plan(original, fused)
    assert plan
    assert {p.reason for p in plan} == {reason}
    assert not any(p.written for p in plan)
    for key, value in original.state_dict().items():
        assert torch.equal(state[key], value), key


def test_checkpoint_form_raises_for_an_argument_that_is_not_a_module() -> None:
    net = conv_bn().eval()
    for call in (checkpoint_state_dict, checkpoint_plan):
        with pytest.raises(
            TypeError,
            match=rf"^{call.__name__}\(original=\.\.\.\) expects a torch\.nn\.Module, got dict\. "
            rf"Call {call.__name__}\(model, fuse\(model\)\)\.",
        ):
            call({}, fuse(net))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"\(fused=\.\.\.\) expects a torch\.nn\.Module, got str\."):
            call(net, "fused")  # type: ignore[arg-type]


def test_checkpoint_form_raises_for_a_module_that_fuse_did_not_return() -> None:
    net = conv_bn().eval()
    for call in (checkpoint_state_dict, checkpoint_plan):
        with pytest.raises(
            TypeError,
            match=r"\(fused=\.\.\.\) expects the module returned by fx_lightning\.fuse\(\), which carries "
            r"\.fusion_report; got a Sequential without one\. Pass fused=fuse\(original\)\.",
        ):
            call(net, copy.deepcopy(net))


def test_checkpoint_plan_errors_name_checkpoint_plan() -> None:
    with pytest.raises(TypeError, match=r"^checkpoint_plan\(original=\.\.\.\)"):
        checkpoint_plan({}, fuse(conv_bn().eval()))  # type: ignore[arg-type]

"""fuse is never silently wrong: one test per class of program that once came back wrong or crashed.

Each test builds the smallest program of its class, fuses it (with and, where it matters, without example
inputs) and checks, against the original in float64: the fused output, that the caller's model is untouched,
and that the checkpoint form loads strictly into a fresh instance and computes the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrizations

from fx_lightning import checkpoint_state_dict, count_kernels, fuse
from fx_lightning.testing import randomize_batch_norm


def _float64_error(module: nn.Module, reference: nn.Module, inputs: tuple[Tensor, ...]) -> float:
    """Max abs error of ``module`` against a float64 copy of ``reference``, relative to the output's scale."""
    with torch.no_grad():
        try:
            want = copy.deepcopy(reference).double().eval()(*(x.double() for x in inputs))
        except RuntimeError:  # torch.nn.utils.weight_norm modules cannot be deep-copied: compare in float32
            want = reference.eval()(*inputs).double()
        got = module.eval()(*inputs).double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0))


def check(factory: Callable[[], nn.Module], *inputs: Tensor, with_inputs: bool | None = None) -> nn.Module:
    """Fuse a seeded, randomised ``factory()`` (with and without example inputs) and check everything; returns
    the fused module of the last run."""
    torch.manual_seed(0)
    model = randomize_batch_norm(factory()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = _float64_error(model, model, inputs)
    fused = model
    for example in (None, inputs) if with_inputs is None else (inputs if with_inputs else None,):
        fused = fuse(model, example_inputs=example)
        error = _float64_error(fused, model, inputs)
        assert error <= 2 * own + 1e-5, f"example_inputs={example is not None}: {error:.3g}\n{fused.fusion_report}"
        state = checkpoint_state_dict(model, fused)
        torch.manual_seed(1)
        fresh = factory()
        fresh.load_state_dict(state, strict=True)
        assert _float64_error(fresh, model, inputs) <= 2 * own + 1e-5, "checkpoint form"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the caller's model changed"
    return fused


def seq_of(*layers: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*copy.deepcopy(layers))


# ----------------------------------------------------------------------------------------- A: ranks


def test_fuse_conv1d_on_unbatched_input_does_not_fold_into_batch_norm1d() -> None:
    # (4, 6) -> Conv1d -> (6, 6): BatchNorm1d treats dim 0 as the batch and normalises dim 1, the length.
    fused = check(seq_of(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)), torch.randn(4, 6))
    assert fused.fusion_report.num_folded == 0
    assert "unbatched" in fused.fusion_report.skipped[0].reason


def test_fuse_conv3d_on_unbatched_input_does_not_fold_into_batch_norm2d() -> None:
    # (C, D, H, W) -> Conv3d -> 4-D output, which BatchNorm2d accepts as (N, C, H, W): folding would be wrong.
    fused = check(seq_of(nn.Conv3d(2, 3, 1), nn.BatchNorm2d(3)), torch.randn(2, 3, 4, 5))
    assert fused.fusion_report.num_folded == 0


def test_fuse_conv1d_batch_norm1d_folds_once_example_inputs_show_the_batch() -> None:
    x = torch.randn(2, 4, 6)
    assert check(seq_of(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)), x, with_inputs=True).fusion_report.num_folded == 1
    fused = check(seq_of(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)), x, with_inputs=False)
    assert "rank of '0' output is unknown" in fused.fusion_report.skipped[0].reason


# ----------------------------------------------------------------------------------------- B: in-place writes


class ReadAfterWrite(nn.Module):
    """``y = bn(h); h.relu_(); conv1x1(y) + h``: the fold into conv1x1 would read ``h`` after the write."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        y = self.bn(h)
        h.relu_()
        return self.conv(y) + h


class MergeAcrossWrite(nn.Module):
    """``a = c3(h); h.relu_(); a + c1(h)``: one merged conv would read ``h`` once, before or after the write."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.c3, self.b3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        a = self.b3(self.c3(h))
        h.relu_()
        return a + self.b1(self.c1(h))


@pytest.mark.parametrize("factory", [ReadAfterWrite, MergeAcrossWrite])
def test_fuse_never_moves_a_read_across_an_in_place_write(factory: Callable[[], nn.Module]) -> None:
    x = torch.randn(2, 3, 6, 6)
    check(factory, x)
    torch.manual_seed(0)
    model = randomize_batch_norm(factory()).eval()
    assert _float64_error(fuse(model, form="graph"), model, (x,)) <= 1e-5


class AugmentedView(nn.Module):
    """``h = x.flatten(1); x += y; return h``: torch.fx alone records ``x + y`` and the view loses the write."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        h = x.flatten(1)
        x += 1.0
        return h


def test_fuse_graph_form_keeps_augmented_assignment_in_place() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(AugmentedView()).eval()
    x = torch.randn(2, 3, 4, 4)
    for form in ("modules", "graph"):
        assert _float64_error(fuse(model, form=form), model, (x,)) <= 1e-5, form


# ----------------------------------------------------------------------------------------- C: hooks


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _double(_: nn.Module, __: tuple[Tensor, ...], out: Tensor) -> Tensor:
    return out * 2


def test_fuse_keeps_forward_hooks_on_the_model_and_on_traced_children() -> None:
    def hooked_model() -> nn.Module:
        model = nn.Sequential(Block(), Block())
        model.register_forward_hook(_double)
        return model

    def hooked_child() -> nn.Module:
        model = nn.Sequential(Block(), Block())
        model[1].register_forward_hook(_double)
        return model

    x = torch.randn(2, 3, 5, 5)
    for factory in (hooked_model, hooked_child):
        fused = check(factory, x)
        assert fused.fusion_report.num_folded == 2
        assert count_kernels(fused, x) == 0


# ----------------------------------------------------------------------------------------- D: layer subclasses


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: the weight actually used is computed from the stored one."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        weight = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, weight, bias)


def test_fuse_does_not_fold_into_a_conv_that_recomputes_its_weight() -> None:
    x = torch.randn(2, 3, 5, 5)
    fused = check(seq_of(StandardisedConv(3, 4, 3), nn.BatchNorm2d(4)), x)
    assert fused.fusion_report.num_folded == 0

    def weight_normed() -> nn.Module:  # parametrized, hence a leaf of the trace
        return nn.Sequential(parametrizations.weight_norm(StandardisedConv(3, 4, 3)), nn.BatchNorm2d(4))

    assert check(weight_normed, x).fusion_report.num_folded == 0


# ----------------------------------------------------------------------------------------- E: untraced parents


class Untraceable(nn.Module):
    """Data-dependent control flow, and code that iterates, indexes and reaches into its children."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.blk = Block()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            x = -x
        for layer in self.seq:
            x = layer(x)
        x = self.seq[0](x) if len(self.seq) == 3 else x
        return self.blk(x) * self.blk.bn.weight.view(1, -1, 1, 1)


def test_fuse_untraceable_parent_that_iterates_indexes_and_reads_children() -> None:
    # It calls seq[0] a second time by itself: a fold into seq[0] would be wrong there. Without example inputs
    # nothing it reaches into is folded; with them, the self-check reverts what does not agree.
    x = torch.randn(2, 3, 5, 5)
    fused = check(Untraceable, x, with_inputs=False)
    assert type(fused.seq) is nn.Sequential
    assert len(fused.seq) == 3
    assert fused.fusion_report.num_folded == 0
    assert all("reaches into" in s.reason for s in fused.fusion_report.skipped)
    fused = check(Untraceable, x, with_inputs=True)
    assert fused.fusion_report.reverted == ["seq.0", "seq.1"]  # the layer and its BatchNorm, together
    assert [r.bn for r in fused.fusion_report.folded] == ["blk.bn"]


class CallsItsChildren(nn.Module):
    """Untraceable, but only calls its children: their folds need no example inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Block(), Block()

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_fuse_untraceable_parent_that_only_calls_its_children() -> None:
    fused = check(CallsItsChildren, torch.randn(2, 3, 5, 5), with_inputs=False)
    assert fused.fusion_report.num_folded == 2


# ----------------------------------------------------------------------------------------- F/G: other readers


class WeightReadElsewhere(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if self.how == "conv":
            return y + F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        return y + self.conv.weight.abs().sum()


@pytest.mark.parametrize("how", ["conv", "sum"])
def test_fuse_layer_weight_read_elsewhere_keeps_its_value(how: str) -> None:
    fused = check(lambda: WeightReadElsewhere(how), torch.randn(2, 3, 5, 5))
    assert fused.fusion_report.num_folded == 1


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


class CalledByUntraced(nn.Module):
    """``bn(blk.conv(x)) + blk(x)``: blk cannot be traced and calls the same conv."""

    def __init__(self) -> None:
        super().__init__()
        self.blk, self.bn = Opaque(), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.blk.conv(x)) + self.blk(x)


def test_fuse_layer_also_called_by_an_untraced_module_is_not_replaced() -> None:
    check(CalledByUntraced, torch.randn(2, 3, 5, 5))


# ----------------------------------------------------------------------------------------- H: side effects


@torch.fx.wrap
def _add_one_in_place(t: Tensor) -> None:
    t.add_(1.0)


class SideEffects(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        z = torch.empty_like(y)
        torch.mul(y, 2, out=z)
        _add_one_in_place(z)
        return z


def test_fuse_keeps_out_arguments_and_wrapped_in_place_helpers() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(SideEffects()).eval()
    x = torch.randn(2, 3, 4, 4)
    for form in ("modules", "graph"):
        assert _float64_error(fuse(model, form=form), model, (x,)) <= 1e-5, form


# ----------------------------------------------------------------------------------------- I: norm wrappers


class NormedAndRead(nn.Module):
    def __init__(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.conv, self.bn = wrap(nn.Conv2d(3, 3, 3, padding=1)), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) + self.conv.weight.sum()


@pytest.mark.parametrize(
    "wrap",
    [nn.utils.weight_norm, parametrizations.weight_norm, parametrizations.spectral_norm],
    ids=["weight_norm", "parametrized_weight_norm", "spectral_norm"],
)
def test_fuse_norm_wrapped_conv_whose_weight_is_read(wrap: Callable[[nn.Module], nn.Module]) -> None:
    check(lambda: NormedAndRead(wrap), torch.randn(2, 3, 5, 5))


# ----------------------------------------------------------------------------------------- J: fusing again


def test_fuse_of_fused_and_of_traced_models() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(Block(), Block())).eval()
    x = torch.randn(2, 3, 5, 5)
    for form in ("modules", "graph"):
        once = fuse(model, form=form)
        twice = fuse(once)
        assert _float64_error(twice, model, (x,)) <= 1e-5
    traced = fuse(fx.symbolic_trace(model))
    assert _float64_error(traced, model, (x,)) <= 1e-5
    assert traced.fusion_report.num_folded == 2


# ----------------------------------------------------------------------------------------- checkpoint form


class ConvTwiceTwoNorms(nn.Module):
    """``b1(c(x)) + b2(c(2 * x))``: one conv, two call sites, two BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b1, self.b2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b1(self.c(x)) + self.b2(self.c(2 * x))


class NormTwice(nn.Module):
    """``b(c2(relu(b(c1(x)))))``: one BatchNorm module after two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.c2(F.relu(self.b(self.c1(x)))))


@pytest.mark.parametrize("factory", [ConvTwiceTwoNorms, NormTwice])
def test_checkpoint_form_of_folds_that_need_generated_code_keeps_original_values(
    factory: Callable[[], nn.Module],
) -> None:
    fused = check(factory, torch.randn(2, 3, 5, 5))
    assert fused.fusion_report.num_folded == 2
    assert fused.fusion_report.graphs == [""]


def test_checkpoint_form_of_a_plain_conv_bn_network_carries_the_folded_weights() -> None:
    fused = check(lambda: nn.Sequential(Block(), Block()), torch.randn(2, 3, 5, 5))
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(Block(), Block())).eval()
    state = checkpoint_state_dict(model, fused)
    assert torch.equal(state["0.conv.weight"], fused[0].conv.weight)
    assert torch.equal(state["0.bn.running_mean"], torch.zeros(3))


# ----------------------------------------------------------------------------------------- timm's patterns


class InPlaceBranchSum(nn.Module):
    """timm's MobileOneBlock: ``out = a(x)``, a shape assert on ``out``, then ``out += b(x)`` in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        out = self.a(x)
        torch._assert(out.ndim == 4, "4-D")
        out += self.b(x)
        return out


def test_fuse_merges_an_in_place_sum_whose_first_term_is_shape_checked() -> None:
    x = torch.randn(2, 4, 6, 6)
    fused = check(InPlaceBranchSum, x)
    assert count_kernels(fused, x, keyword="convolution") == 1
    assert fused.fusion_report.graphs == [""]


class OptionalChild(nn.Module):
    """Untraceable; ``if self.post is not None`` only looks at the child, it does not reach into it."""

    def __init__(self) -> None:
        super().__init__()
        self.post = Block()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0 and isinstance(self.post, nn.Module) and self.post is not None:
            return self.post(x)
        return self.post(-x)


def test_fuse_none_checks_on_a_child_do_not_count_as_reaching_into_it() -> None:
    assert check(OptionalChild, torch.randn(2, 3, 5, 5), with_inputs=False).fusion_report.num_folded == 1


class CachingBlock(nn.Module):
    """timm's attention-bias cache: the forward stores a tensor per device the first time it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))
        self.bn = nn.BatchNorm2d(3)
        self.shift = nn.Parameter(torch.randn(1, 3, 1, 1))
        self.cache: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.shift * 2
        return self.bn(F.conv2d(x, self.weight)) + self.cache[key]  # a functional fold: generated code


def test_fuse_traces_a_caching_block_twice_without_mixing_graphs() -> None:
    # The whole-model trace fills the copy's cache with a traced value; the block's own trace must not read it.
    fused = check(lambda: nn.Sequential(CachingBlock(), CachingBlock()), torch.randn(2, 3, 4, 4))
    assert fused.fusion_report.graphs == ["0", "1"]


class IndexesItsChild(nn.Module):
    """Calls ``seq0`` whole and its first layer alone: folding ``seq0.1`` into ``seq0.0`` needs generated code."""

    def __init__(self) -> None:
        super().__init__()
        self.seq0 = nn.Sequential(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3), nn.SiLU())
        self.bn0 = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.seq0(x), self.bn0(self.seq0[0](x))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_fuse_kept_forward_that_indexes_a_rewritten_child(with_inputs: bool) -> None:
    # The generated code must replace a module that holds the forward indexing `self.seq0[0]` (here the model),
    # or that forward raises "'GraphModule' object is not subscriptable" (it did, without example inputs).
    x = torch.randn(3, 4, 4, 7)
    torch.manual_seed(0)
    model = randomize_batch_norm(IndexesItsChild()).eval()
    fused = fuse(model, example_inputs=(x,) if with_inputs else None)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = fused(x)
    for a, b in zip(got, want):
        assert float((a.double() - b).abs().max() / b.abs().max()) <= 1e-5
    report = fused.fusion_report
    assert [r.bn for r in report.folded] == ["seq0.1"]
    assert report.graphs == [""]
    assert report.reverted == []

"""The self-check of fuse (``fx_lightning.fusion.self_check``): each rewritten unit checked on what it receives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, fx, nn

from engine_nets import conv_bn
from fx_lightning import fuse, registered_passes
from fx_lightning.fusion.passes import PassChanges, Rewrite
from fx_lightning.fusion.passes.rewriting import install_for_node, scope_of, with_new_params
from fx_lightning.fusion.report import Merged
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err


def _double_conv_in(block: str) -> object:
    """A deliberately wrong pass: doubles the weight of the conv called inside ``block``, in generated code.

    In the model's graph it picks the conv whose call sits in ``block``'s forward; in the graph of ``block`` traced
    on its own (to build its generated code) the only conv.
    """

    def wrong(gm: fx.GraphModule) -> PassChanges:
        changes = PassChanges()
        convs = [
            n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
        ]
        picked = convs if len(convs) == 1 else [n for n in convs if scope_of([n]) == block]
        if not picked or picked[0].meta.get("doubled"):
            return changes
        node = picked[0]
        conv = gm.get_submodule(node.target)
        new = with_new_params(conv, conv.weight * 2, None if conv.bias is None else conv.bias.clone())
        target = install_for_node(gm, node, new)
        node.meta["doubled"] = True
        changes.rewrites.append(Rewrite("wrong", [Merged(target, ("weight * 2",), "wrong")], scope_of([node])))
        return changes

    return wrong


def test_self_check_reverts_only_the_unit_that_misbehaves(monkeypatch: pytest.MonkeyPatch) -> None:
    from fx_lightning.fusion import api

    registry = {**registered_passes(), "wrong": _double_conv_in("1")}
    monkeypatch.setattr(api, "registered_passes", lambda: registry)
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4), conv_bn(4, 4))).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = fuse(model, example_inputs=(x,))
    report = fused.fusion_report
    assert report.reverted == ["1"]  # the generated code for block 1, and nothing else
    assert "'1' changed with it" in report.reverted_reasons["1"]
    assert "max rel diff" in report.reverted_reasons["1"]
    assert sorted(r.bn for r in report.folded) == ["0.1", "1.1", "2.1"]  # block 1's in-place fold stays
    assert type(fused) is nn.Sequential
    assert report.graphs == []
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5
    assert report.max_rel_error is not None
    assert report.max_rel_error <= 1e-5


class TiedScores(nn.Module):
    """Two score channels equal in exact arithmetic, and an argmax over them: float rounding picks the winner.

    The folded head is exact, yet about half of the labels differ between the original and the fused model, as
    post-NMS detections do when rounding moves a near-tied box.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2))
        with torch.no_grad():
            conv, bn = self.head
            conv.weight[1], conv.bias[1] = conv.weight[0], conv.bias[0]
            var, weight, mean, bias = 0.7, 1.3, 0.1, 0.2
            scale = weight / (var + bn.eps) ** 0.5
            bn.running_var.copy_(torch.tensor([var, 4 * (var + bn.eps) - bn.eps]))
            bn.weight.copy_(torch.tensor([weight, 2 * weight]))
            bn.running_mean.copy_(torch.tensor([mean, mean + 0.37]))
            bn.bias.copy_(torch.tensor([bias, bias + 0.37 * scale]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.head(x)
        return scores.argmax(1), scores.amax(1)


def test_self_check_keeps_an_exact_fold_whose_selection_flips() -> None:
    torch.manual_seed(0)
    model = TiedScores().eval()
    x = torch.randn(2, 3, 16, 16)
    fused = fuse(model, example_inputs=(x,))
    with torch.no_grad():
        labels, best = model(x)
        fused_labels, fused_best = fused(x)
    assert (labels != fused_labels).sum() > 10  # rounding flips ties: a whole-model comparison would revert
    assert rel_err(fused_best, best) <= 1e-5
    report = fused.fusion_report
    assert report.reverted == []
    assert [r.bn for r in report.folded] == ["head.1"]
    assert report.max_rel_error is None  # a selection is not a continuous output


class Huge(nn.Module):
    """Raw head outputs of magnitude 1e7, as detection heads trained with their own loss can produce."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        with torch.no_grad():
            self.block2[1].weight.mul_(1e7)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.block(x))


def test_self_check_outputs_of_magnitude_1e7() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(Huge()).eval()
    with torch.no_grad():
        model.block2[1].weight.mul_(1e7)
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(model, example_inputs=(x,))
    with torch.no_grad():
        want = model.double()(x.double())
        model.float()
        out = model(x)
        got = fused(x)
    assert want.abs().max() > 1e6
    assert float((out.double() - got.double()).abs().max()) > 1e-3  # an absolute 1e-3 would call it wrong
    assert rel_err(got, want) <= 1e-5
    report = fused.fusion_report
    assert report.reverted == []
    assert report.num_folded == 2
    assert report.max_rel_error is not None
    assert report.max_rel_error <= 1e-5


def test_self_check_returns_the_unfused_copy_when_no_unit_explains_a_mismatch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fx_lightning.fusion import api, self_check

    # Units that all pass while the model is wrong: what a reader outside a unit's module would cause.
    registry = {**registered_passes(), "wrong": _double_conv_in("1")}
    monkeypatch.setattr(api, "registered_passes", lambda: registry)
    monkeypatch.setattr(self_check._Check, "trial", lambda self, scope, applied: self_check._Verdict(True))
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match=r"fuse\(\): the fused model disagrees with the original .* unfused copy"):
        fused = fuse(model, example_inputs=(x,))
    report = fused.fusion_report
    assert report.num_folded == 0
    assert report.max_rel_error is None
    assert sorted(report.reverted) == ["0.0", "0.1", "1", "1.0", "1.1"]  # every replacement made
    assert any("a bug in fx_lightning's analysis to report" in n for n in report.notes)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) == 0.0


def test_self_check_costs_a_few_forwards_when_every_unit_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    # The recording forward of the original, then one forward of the fused model that compares each outermost unit
    # as it returns and gives the whole model's output: two forwards' worth of conv calls, however many rewrites
    # there are (no bisection, no float64 copy, and no shape propagation: conv + BatchNorm2d folds need no shapes).
    model = randomize_batch_norm(nn.Sequential(*(conv_bn(4, 4) for _ in range(6)))).eval()
    calls = []
    forward = nn.Conv2d.forward

    def counting(self: nn.Conv2d, x: Tensor) -> Tensor:
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(nn.Conv2d, "forward", counting)
    fused = fuse(model, example_inputs=(torch.randn(2, 4, 6, 6),))
    assert fused.fusion_report.num_folded == 6
    assert len(calls) == 2 * 6


class _UntracedRoot(nn.Module):
    """A root torch.fx cannot trace (control flow on a tensor's value): its blocks are traced apart."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.third = conv_bn(4, 4), conv_bn(4, 4), conv_bn(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.first(x)
        if x.sum() > float("-inf"):
            x = self.second(x)
        return self.third(x)


def test_self_check_reuses_the_forward_that_found_what_parts_receive(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under an untraced root, one forward of the original tells each part traced apart what it receives; the same
    # forward records what the self-check compares against. Then: that forward, and one forward of the fused model
    # that compares each outermost unit as it returns: two forwards' worth of conv calls (the parts' conv +
    # BatchNorm2d folds need no shapes).
    model = randomize_batch_norm(_UntracedRoot()).eval()
    calls = []
    forward = nn.Conv2d.forward

    def counting(self: nn.Conv2d, x: Tensor) -> Tensor:
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(nn.Conv2d, "forward", counting)
    x = torch.randn(2, 4, 6, 6)
    fused = fuse(model, example_inputs=(x,))
    report = fused.fusion_report
    assert (report.num_folded, report.reverted, report.untraced[0].path) == (3, [], "<model>")
    assert len(calls) == 2 * 3
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 1e-5


class _WritesBetween(nn.Module):
    """Adds into its first layer's output in place before its second layer reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        y.add_(1.0)
        return self.b(y)


def test_recording_copies_a_tensor_handed_on_unchanged_once_and_a_written_one_again() -> None:
    from fx_lightning.fusion.self_check import Recording

    model = nn.Sequential(nn.Sequential(_WritesBetween())).eval()
    recording = Recording()
    handles = recording.hook(model, ["", "0", "0.0", "0.0.a", "0.0.b"])
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    recording.keep(out, (x,))
    records = recording.records
    # the input reaches three nested modules and the first layer: one copy
    assert records[""].args[0] is records["0"].args[0] is records["0.0"].args[0] is records["0.0.a"].args[0]
    assert records["0.0.b"].output is records["0.0"].output is records[""].output
    # written into after 'a' returned it: 'b' received a new copy, with the write
    torch.testing.assert_close(records["0.0.b"].args[0], records["0.0.a"].output + 1.0)
    assert torch.equal(records[""].output, out)
    assert records[""].output is not out
    assert recording.copies == {}  # nothing of the forward held on after keep


class _HalvedInput(nn.Module):
    """A network whose forward pre-hook replaces its input (hooks that normalise or cast inputs do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.register_forward_pre_hook(lambda _, args: (args[0] * 0.5, *args[1:]))

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc(x))


def test_self_check_runs_a_unit_on_what_its_caller_passed_not_on_what_its_pre_hook_made_of_it() -> None:
    # Recorded after the pre-hook, the input would be halved again when the unit runs: the check would compare
    # the unit on x / 4 with the original on x / 2 and call an exact fold wrong.
    import warnings

    model = randomize_batch_norm(_HalvedInput()).eval()
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fuse(model, example_inputs=(x,))
    report = fused.fusion_report
    assert [r.bn for r in report.folded] == ["bn"]
    assert report.reverted == []
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


def _check_one_swap(model: nn.Module, container_path: str, name: str, scope: str, x: Tensor) -> Any:
    """Swap a deliberately wrong conv (weights doubled) in at ``container_path.name`` and run the self-check."""
    import copy
    import warnings

    from fx_lightning.fusion.engine import _Unit
    from fx_lightning.fusion.report import FusionReport
    from fx_lightning.fusion.self_check import check_units

    fused = copy.deepcopy(model)
    container = fused.get_submodule(container_path)
    old = container._modules[name]
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.weight.mul_(2.0)
    container._modules[name] = new
    unit = _Unit(f"{container_path}.{name}", container, name, old, new, group=0, scope=scope)
    report = FusionReport(model=type(model).__name__)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check_units(fused, [unit], (x,), report)
    return result, report


class _ReplacesAnElement(nn.Module):
    """Writes its result into the list it receives, as ultralytics' Detect head does (``x[i] = ...``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, xs: list[Tensor]) -> Tensor:
        xs[0] = self.conv(xs[0])
        return xs[1] * 1.0


class _ListLabels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = _ReplacesAnElement()

    def forward(self, x: Tensor) -> Tensor:
        xs = [x, x + 1]
        y = self.head(xs)
        return (xs[0] + y).argmax(1)  # labels: the whole-model comparison is no verdict


class _WritesThroughData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x.data.copy_(self.conv(x))  # moves no version counter
        return x.new_zeros(())


class _DataLabels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = _WritesThroughData()

    def forward(self, x: Tensor) -> Tensor:
        x = x + 0
        self.w(x)
        return x.argmax(1)


@pytest.mark.parametrize(
    ("model", "container", "scope"),
    [(_ListLabels(), "head", "head"), (_DataLabels(), "w", "w")],
    ids=["list-element-replaced", "write-through-data"],
)
def test_self_check_sees_writes_into_inputs_that_move_no_version_counter(
    model: nn.Module, container: str, scope: str
) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    result, report = _check_one_swap(model.eval(), container, "conv", scope, x)
    assert report.reverted == [f"{container}.conv"]
    with torch.no_grad():
        assert torch.equal(result(x), model(x))


def test_fuse_with_example_inputs_under_inference_mode() -> None:
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 8, 8)
        fused = fuse(model, example_inputs=(x,))
        assert fused.fusion_report.num_folded == 1
        assert fused.fusion_report.reverted == []
        assert rel_err(fused(x), model(x)) <= 1e-5


def test_fuse_forgets_the_example_inputs_and_the_model_it_fused() -> None:
    import gc
    import weakref

    import torch.nn.functional as F

    class FunctionalBlock(nn.Module):
        """A BatchNorm after a functional conv: folded in generated code, whose passes get deferred shapes."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(F.conv2d(x, self.weight)) * 1.0

    refs = []
    for _ in range(2):
        model = nn.Sequential(FunctionalBlock(), FunctionalBlock()).eval()
        x = torch.randn(2, 3, 4, 4)
        fused = fuse(model, example_inputs=(x,))
        assert fused.fusion_report.num_folded == 2
        refs.append((weakref.ref(fused), weakref.ref(x)))
        del model, x, fused
    gc.collect()
    assert [(f() is None, x() is None) for f, x in refs] == [(True, True), (True, True)]

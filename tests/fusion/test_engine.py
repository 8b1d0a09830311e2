"""fuse(): the contract — same function, caller's model untouched, report, fallback, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import fx, nn

from engine_nets import ConvNormAct, LibraryStyleNet, batch_norm_count, conv_bn
from fx_lightning import Merged, count_kernels, fuse, register_pass, registered_passes
from fx_lightning.fusion.passes import PassChanges, Rewrite
from fx_lightning.fusion.passes.rewriting import install_for_node, with_new_params
from fx_lightning.testing import randomize_batch_norm
from numerics import rel_err


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "types": [type(m) for m in model.modules()],
    }


def _assert_same_snapshot(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    assert a["types"] == b["types"]
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key


def test_fuse_leaves_train_mode_model_untouched() -> None:
    model = randomize_batch_norm(LibraryStyleNet()).train()
    model.stem.conv.weight.requires_grad_(False)
    before = _snapshot(model)
    fused = fuse(model)
    _assert_same_snapshot(before, _snapshot(model))
    assert model.training
    assert not fused.training
    assert not any(m.training for m in fused.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(fused(x), model.eval()(x)) <= 1e-5


def test_fuse_result_is_independent_of_later_changes_to_fused() -> None:
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4), nn.Conv2d(4, 4, 1)))
    fused = fuse(model)
    fused.train().to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model[0][1].training


def test_fuse_shares_untouched_parameters_without_copying() -> None:
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4), nn.Conv2d(4, 4, 1)))
    fused = fuse(model)
    untouched = getattr(fused, "1").weight
    assert untouched.data_ptr() == model[1].weight.data_ptr()
    assert untouched is not model[1].weight


def test_fuse_keeps_dtype_device_and_channels_last() -> None:
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4)))
    model = model.to(torch.float64).to(memory_format=torch.channels_last)
    fused = fuse(model)
    for p in fused.parameters():
        assert p.dtype == torch.float64
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)


def test_fuse_folds_through_untraceable_block_and_reports_it() -> None:
    model = randomize_batch_norm(LibraryStyleNet()).eval()
    fused = fuse(model)
    report = fused.fusion_report
    assert [u.path for u in report.untraced] == ["mid"]
    assert "TraceError" in report.untraced[0].error
    assert report.num_folded == 6
    assert report.num_skipped == 0
    for x in (torch.randn(2, 3, 16, 16), -torch.rand(2, 3, 16, 16)):  # both branches of the block
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) <= 1e-5
        assert count_kernels(model, x) == 5
        assert count_kernels(fused, x) == 0


class UntraceableRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ConvNormAct(3, 4)
        self.b = nn.Sequential(conv_bn(4, 4), nn.Dropout())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        return self.b(x) if x.sum() > 0 else self.bn(x)


def test_fuse_untraceable_root_fuses_children() -> None:
    model = randomize_batch_norm(UntraceableRoot()).eval()
    fused = fuse(model)
    report = fused.fusion_report
    assert report.untraced[0].path == "<model>"
    assert sorted(r.bn for r in report.folded) == ["a.bn", "b.0.1"]
    assert [(s.bn, s.reason) for s in report.skipped] == [("bn", "its parent '<model>' could not be traced")]
    assert type(fused) is type(model)
    assert type(fused.a) is type(model.a)  # the child keeps its class; its fused layers sit in it
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


def test_fuse_model_without_batch_norm_comes_back_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout())
    fused = fuse(model)
    assert not isinstance(fused, fx.GraphModule)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    assert "no BatchNorm found" in fused.fusion_report.notes[0]


def test_fuse_runs_only_the_chosen_passes() -> None:
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4), nn.Dropout()))
    fused = fuse(model, passes=["remove_dropout"], form="graph")
    assert batch_norm_count(fused) == 1
    assert fused.fusion_report.skipped[0].reason == "no fusion pass applies to it"
    assert [r.kind for r in fused.fusion_report.removed] == ["Dropout"]


def test_fuse_leaf_modules_are_not_traced_through() -> None:
    model = randomize_batch_norm(nn.Sequential(ConvNormAct(3, 4), conv_bn(4, 4)))
    fused = fuse(model, leaf_modules=[ConvNormAct])
    assert [r.bn for r in fused.fusion_report.folded] == ["1.1"]


def test_fuse_report_prints_and_serialises() -> None:
    fused = fuse(randomize_batch_norm(LibraryStyleNet()))
    text = str(fused.fusion_report)
    assert "folded 6 BatchNorm" in text
    assert "stem.bn" in text
    assert "untraced" in text
    data = json.loads(json.dumps(fused.fusion_report.to_dict()))
    assert len(data["folded"]) == 6
    assert data["untraced"][0]["path"] == "mid"


def test_fuse_rejects_non_module() -> None:
    with pytest.raises(TypeError, match=r"fuse\(model=...\) expects a torch.nn.Module, got dict"):
        fuse({"net": nn.Conv2d(1, 1, 1)})


def test_fuse_rejects_bare_tensor_example_inputs() -> None:
    with pytest.raises(TypeError, match=r"example_inputs=\(x,\)"):
        fuse(nn.Conv2d(1, 1, 1), example_inputs=torch.randn(1, 1, 2, 2))


def test_fuse_rejects_unknown_pass() -> None:
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['fold_everything'\]. Registered passes:"):
        fuse(nn.Conv2d(1, 1, 1), passes=["fold_everything"])


def test_fuse_rejects_non_class_leaf_modules() -> None:
    with pytest.raises(TypeError, match=r"expects nn.Module subclasses, got \['Conv2d'\]"):
        fuse(nn.Conv2d(1, 1, 1), leaf_modules=["Conv2d"])


def test_register_pass_rejects_duplicate_name() -> None:
    with pytest.raises(ValueError, match=r"a pass named 'remove_dropout' is already registered"):
        register_pass("remove_dropout", lambda gm: None)


def test_fuse_channels_last_model_output_matches() -> None:
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 8), conv_bn(8, 8, groups=8))).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    fused = fuse(model)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fuse_rejects_scripted_module() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))
    with pytest.raises(TypeError, match=r"got a RecursiveScriptModule.*before torch.jit.script"):
        fuse(scripted)


def test_fuse_rejects_data_parallel_wrapper() -> None:
    with pytest.raises(TypeError, match=r"got a DataParallel.*fuse\(model.module\)"):
        fuse(nn.DataParallel(nn.Conv2d(1, 1, 1)))


def test_fuse_rejects_compiled_module() -> None:
    compiled = torch.compile(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match=r"got a OptimizedModule.*fuse\(model._orig_mod\)"):
        fuse(compiled)


class _ValueBranch(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace this root, so its children are traced apart."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) if x.sum() > float("-inf") else x


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),  # folded, then checked
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),  # nothing to fold: the inputs are still run once
        _ValueBranch(),  # traced apart: the forward that finds what the parts receive fails
    ],
    ids=["folded", "nothing-to-fold", "untraced-root"],
)
def test_fuse_rejects_example_inputs_the_model_cannot_run(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"could not run the model on inputs of shapes \[\(1, 5, 8, 8\)\]"):
        fuse(model.eval(), example_inputs=(torch.randn(1, 5, 8, 8),))


class _InPlaceStatements(nn.Module):
    """In-place updates written as statements whose result is unused, as timm's NFNet blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gain = nn.Parameter(torch.full((1, 4, 1, 1), 3.0))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out.mul_(self.gain)  # result unused: torch.fx's dead-code elimination would drop it
        out.add_(1.0)
        torch.nn.functional.relu(out - 2.0, True)  # a pure-looking call with an inplace flag, result unused
        y = out - 2.5
        self.act(y)  # in-place module call, result unused
        return out + y


def test_fuse_keeps_in_place_statements_whose_result_is_unused() -> None:
    model = _InPlaceStatements().eval()
    randomize_batch_norm(model)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        fused = fuse(model, form="graph")
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    assert fused.fusion_report.num_folded == 1
    assert [n.target for n in fused.graph.nodes if n.op == "call_method"] == ["mul_", "add_"]


# ----------------------------------------------------------------------------------------- self-check


def _scale_first_conv(gm: fx.GraphModule) -> PassChanges:
    """A deliberately wrong rewrite: doubles the first conv's weight (in generated code)."""
    changes = PassChanges()
    node = next(
        (n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)), None
    )
    if node is None or node.meta.get("doubled"):
        return changes
    conv = gm.get_submodule(node.target)
    target = install_for_node(gm, node, with_new_params(conv, conv.weight * 2, conv.bias.clone()))
    node.meta["doubled"] = True
    changes.rewrites.append(Rewrite("wrong", [Merged(target, ("weight * 2",), "wrong")], scope=""))
    return changes


def test_fuse_self_check_reverts_a_rewrite_that_changes_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    from fx_lightning.fusion import api

    registry = {**registered_passes(), "wrong": _scale_first_conv}
    monkeypatch.setattr(api, "registered_passes", lambda: registry)
    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        unchecked = fuse(model)
        checked = fuse(model, example_inputs=(x,))
        assert rel_err(unchecked(x), model(x)) > 0.1  # without inputs nothing can see it
        assert rel_err(checked(x), model(x)) <= 1e-5
    assert checked.fusion_report.reverted == [""]
    assert checked.fusion_report.merged == []  # the reverted graph's records go with it
    assert checked.fusion_report.graphs == []
    assert type(checked) is type(model)
    # What stays is still fused: the two in-place folds agree, only the generated code was reverted.
    assert count_kernels(checked, x) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_self_check_reverts_nothing_on_an_exact_fold(dtype: torch.dtype) -> None:
    import torchvision

    torch.manual_seed(0)
    model = randomize_batch_norm(torchvision.models.resnet18(num_classes=10)).eval().to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    fused = fuse(model, example_inputs=(x,))
    assert fused.fusion_report.reverted == []
    assert fused.fusion_report.num_folded == 20


def test_fuse_rejects_an_unknown_form() -> None:
    with pytest.raises(ValueError, match=r"fuse\(form='tree'\) expects one of \['modules', 'graph'\]"):
        fuse(nn.Conv2d(1, 1, 1), form="tree")  # type: ignore[arg-type]


def test_fuse_notes_when_the_passes_hit_the_round_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from fx_lightning.fusion.passes import manager

    model = randomize_batch_norm(nn.Sequential(conv_bn(3, 4))).eval()
    assert not any("rounds" in n for n in fuse(model).fusion_report.notes)
    monkeypatch.setattr(manager, "MAX_ROUNDS", 1)  # the fold changes the graph in round 1; no round 2 to confirm
    for form in ("modules", "graph"):
        notes = fuse(model, form=form).fusion_report.notes
        assert any("still found rewrites after 1 rounds" in n for n in notes), form


@pytest.mark.parametrize("enabled", [True, False])
def test_fuse_pauses_the_garbage_collector_and_leaves_it_as_it_was(
    monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    import gc

    from fx_lightning.fusion import engine

    during = []
    region = engine._Engine.fuse_region

    def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
        during.append(gc.isenabled())
        return region(self, *args, **kwargs)

    monkeypatch.setattr(engine._Engine, "fuse_region", watched)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        fuse(model, example_inputs=(torch.randn(1, 3, 8, 8),))
        assert during
        assert not any(during)
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError, match="could not run the model"):
            fuse(model, example_inputs=(torch.randn(1, 5, 8, 8),))
        assert gc.isenabled() is enabled  # restored when fuse raises too
    finally:
        gc.enable() if was else gc.disable()

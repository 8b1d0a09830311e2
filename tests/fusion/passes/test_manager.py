"""The pass manager: passes in order, repeated until none applies, one result, errors that name the pass."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import pytest
import torch
from torch import fx, nn

from fx_lightning import fuse, register_pass, registered_passes
from fx_lightning.fusion.passes import PASSES, GraphPass, PassChanges, PassError, PassRun, Rewrite, manager, run_passes
from fx_lightning.fusion.passes.manager import NO_PASS_APPLIES, run_pass
from fx_lightning.fusion.passes.matching import match_batch_norm
from fx_lightning.fusion.report import Removed
from fx_lightning.testing import randomize_batch_norm


def _conv_bn() -> nn.Sequential:
    return randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()


def _graph(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(model)


def _explode_on_conv(gm: fx.GraphModule) -> PassChanges:
    """A broken pass: raises when it reaches the first convolution."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d):
            raise ValueError("weights of an unexpected shape")
    return PassChanges()


def _explode_at_once(gm: fx.GraphModule) -> PassChanges:
    raise KeyError("nothing looked at yet")


@pytest.fixture
def explode_registered() -> Iterator[str]:
    register_pass("explode", _explode_on_conv)
    try:
        yield "explode"
    finally:
        PASSES.unregister("explode")


def test_run_passes_folds_and_reports_one_result() -> None:
    gm = _graph(_conv_bn())
    run = run_passes(gm, registered_passes())
    assert isinstance(run, PassRun)
    assert [(r.bn, r.into, r.rule) for r in run.changes.folded] == [("1", "0", "fold_bn_into_preceding")]
    assert [rw.rule for rw in run.changes.rewrites] == ["fold_bn_into_preceding"]
    assert run.left == []
    assert run.rounds == 2  # the fold in round 1, then a round that finds nothing more
    assert run.capped is False
    assert not any(match_batch_norm(gm, n) for n in gm.graph.nodes)


def test_run_passes_runs_the_passes_in_the_order_given() -> None:
    order: list[str] = []

    def named(name: str) -> GraphPass:
        def fn(gm: fx.GraphModule) -> PassChanges:
            order.append(name)
            return PassChanges()

        return fn

    run_passes(_graph(_conv_bn()), {"b": named("b"), "a": named("a"), "c": named("c")})
    assert order == ["b", "a", "c"]  # one round, since none changed anything


def test_run_passes_runs_a_pass_again_only_when_the_graph_changed_since_it_found_nothing() -> None:
    order: list[str] = []
    registry = registered_passes()

    def logged(name: str) -> GraphPass:
        def fn(gm: fx.GraphModule) -> PassChanges:
            order.append(name)
            return registry[name](gm)

        return fn

    names = ["remove_dropout", "fold_bn_into_preceding", "fold_bn_into_following"]
    run = run_passes(_graph(_conv_bn()), {name: logged(name) for name in names})
    assert [r.bn for r in run.changes.folded] == ["1"]
    assert run.rounds == 2
    # round 1: all three, the fold in the second; round 2: the first (the graph changed after it) and the fold
    # itself (it changed the graph); the third saw the final graph in round 1 and is not run again
    assert order == [*names, "remove_dropout", "fold_bn_into_preceding"]


def test_run_passes_lists_a_batch_norm_no_pass_applies_to() -> None:
    gm = _graph(_conv_bn())
    run = run_passes(gm, {"remove_dropout": registered_passes()["remove_dropout"]})
    assert [(b.name, b.reason) for b in run.left] == [("1", NO_PASS_APPLIES)]
    assert run.left[0].node.target == "1"


def test_run_passes_keeps_each_reason_once_joined_from_every_pass() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    run = run_passes(_graph(model), registered_passes())
    # both fold passes give the same reason for the same call: kept once
    assert [(b.name, b.reason) for b in run.left] == [
        ("1", "no running statistics: it normalises with batch statistics even in eval")
    ]
    assert run.changes.reasons == {"_1": run.left[0].reason}


def test_run_passes_keeps_only_the_last_rounds_reasons() -> None:
    calls = 0

    def changing_reason(gm: fx.GraphModule) -> PassChanges:
        nonlocal calls
        calls += 1
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
        result = PassChanges(reasons={node.name: f"round {calls}"})
        if calls == 1:  # one change in round 1, so that a second round runs
            result.rewrites.append(Rewrite("changing_reason", [Removed("x", "nothing")]))
        return result

    run = run_passes(_graph(_conv_bn()), {"changing_reason": changing_reason})
    assert calls == 2
    assert [b.reason for b in run.left] == ["round 2"]
    assert len(run.changes.rewrites) == 1  # rewrites of every round are kept


def test_run_passes_stops_at_the_round_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager, "MAX_ROUNDS", 3)
    calls = 0

    def always_changes(gm: fx.GraphModule) -> PassChanges:
        nonlocal calls
        calls += 1
        return PassChanges([Rewrite("always_changes", [Removed(f"call{calls}", "nothing")])])

    run = run_passes(_graph(_conv_bn()), {"always_changes": always_changes})
    assert calls == 3
    assert (run.rounds, run.capped) == (3, True)
    assert [r.name for r in run.changes.removed] == ["call1", "call2", "call3"]


def test_run_passes_erases_dead_code_after_a_pass_that_changed_the_graph() -> None:
    class AddThenRelu(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + 1)

    def reroute(modified: bool) -> GraphPass:
        def fn(gm: fx.GraphModule) -> PassChanges:
            relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
            add = relu.args[0]
            if add.op == "call_function":  # reads the input directly from now on; the add is left unread
                relu.replace_input_with(add, add.args[0])
            return PassChanges([Rewrite("reroute", [])] if modified else [])

        return fn

    kept = fx.symbolic_trace(AddThenRelu())
    run_passes(kept, {"reroute": reroute(modified=False)})
    assert operator.add in [n.target for n in kept.graph.nodes]  # a pass that says it changed nothing: no sweep

    swept = fx.symbolic_trace(AddThenRelu())
    run_passes(swept, {"reroute": reroute(modified=True)})
    assert operator.add not in [n.target for n in swept.graph.nodes]


def test_run_pass_names_the_pass_and_node_and_chains_the_error() -> None:
    gm = _graph(_conv_bn())
    passes = {"remove_dropout": registered_passes()["remove_dropout"], "explode": _explode_on_conv}
    with pytest.raises(PassError, match=r"graph pass 'explode' raised ValueError while rewriting node %_0 ") as info:
        run_passes(gm, passes)
    err = info.value
    assert err.pass_name == "explode"
    assert err.node is not None
    assert err.node.name == "_0"
    assert isinstance(err.__cause__, ValueError)
    assert "weights of an unexpected shape" in str(err)
    assert "fuse(model, passes=['remove_dropout'])" in str(err)
    assert isinstance(err, RuntimeError)


def test_run_pass_without_a_node_to_name() -> None:
    with pytest.raises(PassError, match=r"graph pass 'early' raised KeyError: 'nothing looked at yet'\. ") as info:
        run_pass(_graph(_conv_bn()), "early", _explode_at_once)
    assert info.value.node is None
    assert isinstance(info.value.__cause__, KeyError)


def test_run_pass_rejects_a_pass_that_returns_something_else() -> None:
    with pytest.raises(TypeError, match=r"graph pass 'lazy' returned NoneType, expected a PassChanges"):
        run_pass(_graph(_conv_bn()), "lazy", lambda gm: None)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("form", ["modules", "graph"])
def test_fuse_raises_the_pass_error_naming_the_registered_pass(explode_registered: str, form: str) -> None:
    with pytest.raises(PassError, match=r"graph pass 'explode' raised ValueError while rewriting node %_0 ") as info:
        fuse(_conv_bn(), form=form)  # type: ignore[arg-type]
    assert info.value.pass_name == explode_registered
    assert isinstance(info.value.__cause__, ValueError)
    # the fix the message gives works: the other passes fuse the model
    others = [name for name in registered_passes() if name != explode_registered]
    assert f"passes={others!r}" in str(info.value)
    assert fuse(_conv_bn(), passes=others).fusion_report.num_folded == 1

"""rewriting: the facts a pass records (PassChanges, Rewrite, scopes) and the helpers that change a graph."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fx_lightning.fusion.passes.rewriting import (
    PassChanges,
    Rewrite,
    copy_scope,
    erase_dead_code,
    install_for_node,
    module_reached_elsewhere,
    replace_with_input,
    scope_of,
    with_new_params,
)
from fx_lightning.fusion.report import Folded, Merged, Removed


def _node(gm: fx.GraphModule, target: object) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 2, 1)
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x)) + 1


def test_pass_changes_sorts_records_by_kind() -> None:
    folded = Folded("bn", "conv", "fold")
    merged = Merged("conv", ("identity(x)",), "merge")
    removed = Removed("drop", "Dropout")
    changes = PassChanges([Rewrite("fold", [folded, removed]), Rewrite("merge", [merged])])
    assert (changes.folded, changes.merged, changes.removed) == ([folded], [merged], [removed])
    assert changes.modified
    assert not PassChanges(reasons={"bn": "no running statistics"}).modified


def test_scope_of_is_the_deepest_forward_holding_every_node() -> None:
    gm = fx.symbolic_trace(Net())
    relu, conv = _node(gm, torch.relu), _node(gm, "block.conv")
    stem, add = _node(gm, "stem"), _node(gm, operator.add)
    assert scope_of([relu]) == "block"
    assert scope_of([conv]) == "block"  # a module call belongs to its caller's forward
    assert scope_of([relu, conv]) == "block"
    assert scope_of([relu, stem]) == ""
    assert scope_of([add]) == ""


def test_copy_scope_gives_a_new_node_the_scope_it_stands_for() -> None:
    gm = fx.symbolic_trace(Net())
    relu = _node(gm, torch.relu)
    with gm.graph.inserting_after(relu):
        new = gm.graph.call_function(torch.sigmoid, (relu,))
    assert scope_of([new]) == ""  # made by a pass that did not copy the record: the root's
    copy_scope(new, relu)
    assert scope_of([new]) == "block"


def test_with_new_params_leaves_the_original_alone() -> None:
    conv = nn.Conv2d(2, 3, 1)
    conv.register_forward_hook(lambda *_: None)
    before = conv.weight.detach().clone()
    new = with_new_params(conv, torch.ones(3, 2, 1, 1), torch.zeros(3))
    assert type(new) is nn.Conv2d
    assert (new.in_channels, new.out_channels, new.training) == (2, 3, False)
    assert torch.equal(new.weight, torch.ones(3, 2, 1, 1))
    assert isinstance(new.weight, nn.Parameter)
    assert torch.equal(conv.weight, before)
    assert len(new._forward_hooks) == 0
    assert len(conv._forward_hooks) == 1


def test_install_for_node_reuses_the_path_when_nothing_else_reaches_it() -> None:
    gm = fx.symbolic_trace(Net())
    node = _node(gm, "stem")
    new = with_new_params(gm.stem, gm.stem.weight * 2, gm.stem.bias)
    assert install_for_node(gm, node, new) == "stem"
    assert gm.get_submodule("stem") is new
    assert node.target == "stem"


def test_install_for_node_adds_a_sibling_for_a_shared_layer() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    gm = fx.symbolic_trace(Shared())
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    second = next(iter(first.users))
    original = gm.conv
    assert module_reached_elsewhere(gm, "conv", besides=first)
    new = with_new_params(original, original.weight * 2, original.bias)
    assert install_for_node(gm, first, new) == "conv_folded1"
    assert (first.target, second.target) == ("conv_folded1", "conv")
    assert gm.conv is original
    assert gm.conv_folded1 is new


def test_module_reached_elsewhere_sees_fetches_and_enclosing_calls() -> None:
    class Fetches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.conv.weight.sum()

    gm = fx.symbolic_trace(Fetches())
    call = _node(gm, "conv")
    assert module_reached_elsewhere(gm, "conv", besides=call)  # conv.weight is fetched
    net = fx.symbolic_trace(Net())
    assert not module_reached_elsewhere(net, "stem", besides=_node(net, "stem"))


def test_replace_with_input_reroutes_readers_and_erases() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Identity(), nn.ReLU()))
    identity = _node(gm, "1")
    conv = _node(gm, "0")
    replace_with_input(identity, conv)
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "2"]
    assert _node(gm, "2").args == (conv,)


def test_erase_dead_code_keeps_in_place_statements_and_user_functions() -> None:
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()
            self.gain = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = x * 2
            unused = torch.sigmoid(out)  # noqa: F841 - a dead pure call: erased
            self.act(out)  # a dead module call: erased
            out.mul_(self.gain)  # an in-place statement: its result is unused, yet it changes `out`
            _user_side_effect(out)  # a wrapped user function: may do anything
            return out

    gm = fx.symbolic_trace(Dead())
    erased = erase_dead_code(gm)
    gm.recompile()
    kept = [n.target for n in gm.graph.nodes if n.op != "placeholder"]
    assert erased == 2
    assert torch.sigmoid not in kept
    assert "act" not in kept
    assert "mul_" in kept
    assert _user_side_effect in kept
    assert "gain" in kept  # fetched by mul_, which stays
    x = torch.ones(2)
    assert torch.equal(gm(x), Dead()(x))


def test_erase_dead_code_erases_unread_fetches() -> None:
    gm = fx.symbolic_trace(Net())
    with gm.graph.inserting_before(_node(gm, "stem")):
        gm.graph.get_attr("stem.weight")
    assert erase_dead_code(gm) == 1
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]


@fx.wrap
def _user_side_effect(t: torch.Tensor) -> torch.Tensor:
    return t

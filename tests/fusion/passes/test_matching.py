"""matching: what it recognises in small fx graphs (BatchNorm calls, layers, ranks, readers, arithmetic, writes),
what it refuses and why; it never changes the graph."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fx_lightning.fusion.passes.matching import (
    arithmetic_operands,
    asserted_rank,
    conv_padding,
    foldable_batch_norms,
    get_attr_tensor,
    is_library_function,
    match_batch_norm,
    plain_layer_family,
    producer_layer,
    tensor_rank,
    value_users,
    written_between,
    written_inputs,
)


def _node(gm: fx.GraphModule, target: object) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


class FunctionalBN(nn.Module):
    def __init__(self, training: bool = False, computed: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(3))
        self.register_buffer("var", torch.rand(3) + 0.5)
        self.weight = nn.Parameter(torch.randn(3))
        self.training_flag = training
        self.computed = computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = self.var + x.detach().sum() * 0 if self.computed else self.var  # computed from the input
        return F.batch_norm(x, self.mean, var, self.weight, None, self.training_flag, 0.1, 1e-3)


# ----------------------------------------------------------------------------------------------- BatchNorm calls


def test_match_batch_norm_module_form_carries_its_statistics() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, eps=1e-3)).eval())
    call = match_batch_norm(gm, _node(gm, "1"))
    assert call is not None
    assert (call.name, call.num_features, call.reason, call.rank) == ("1", 3, "", 4)
    assert call.input is _node(gm, "0")
    assert call.stats is not None
    assert call.stats.eps == pytest.approx(1e-3)
    assert call.stats.running_mean is gm.get_submodule("1").running_mean


def test_match_batch_norm_is_none_for_anything_else() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    assert [match_batch_norm(gm, n) for n in gm.graph.nodes] == [None, None, None, None]


@pytest.mark.parametrize(
    ("bn", "reason"),
    [
        (nn.BatchNorm2d(3, track_running_stats=False), "no running statistics"),
        (nn.LazyBatchNorm2d(), "lazy BatchNorm not materialised yet"),
    ],
)
def test_match_batch_norm_module_refusals_say_why(bn: nn.Module, reason: str) -> None:
    gm = fx.symbolic_trace(nn.Sequential(bn).eval())
    call = match_batch_norm(gm, _node(gm, "0"))
    assert call is not None
    assert call.stats is None
    assert reason in call.reason


def test_match_batch_norm_refuses_a_hooked_batch_norm() -> None:
    bn = nn.BatchNorm2d(3).eval()
    bn.register_forward_hook(lambda *_: None)
    gm = fx.symbolic_trace(nn.Sequential(bn))
    call = match_batch_norm(gm, _node(gm, "0"))
    assert call is not None
    assert call.stats is None
    assert "forward hooks" in call.reason


def test_match_batch_norm_functional_form() -> None:
    gm = fx.symbolic_trace(FunctionalBN())
    call = match_batch_norm(gm, _node(gm, F.batch_norm))
    assert call is not None
    assert call.stats is not None
    assert (call.num_features, call.module) == (3, None)
    assert call.stats.eps == pytest.approx(1e-3)
    assert call.stats.bias is None
    assert torch.equal(call.stats.running_var, gm.var)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"training": True}, "training=True"),
        ({"computed": True}, "its statistics are computed in the graph"),
    ],
)
def test_match_batch_norm_functional_refusals_say_why(kwargs: dict[str, bool], reason: str) -> None:
    gm = fx.symbolic_trace(FunctionalBN(**kwargs))
    call = match_batch_norm(gm, _node(gm, F.batch_norm))
    assert call is not None
    assert call.stats is None
    assert reason in call.reason


def test_get_attr_tensor_resolves_stored_tensors_only() -> None:
    gm = fx.symbolic_trace(FunctionalBN(computed=True))
    fetched = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "mean")
    computed = _node(gm, "add")  # the variance computed in the graph
    assert get_attr_tensor(gm, fetched)[0] is gm.mean
    assert get_attr_tensor(gm, None) == (None, "")
    tensor, why = get_attr_tensor(gm, computed)
    assert tensor is None
    assert "computed in the graph" in why


def test_foldable_batch_norms_yields_foldable_and_records_why_not() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    gm = fx.symbolic_trace(model.eval())
    reasons: dict[str, str] = {}
    found = [call.name for call in foldable_batch_norms(gm, reasons)]
    assert found == ["1"]
    assert list(reasons) == ["_2"]
    assert "no running statistics" in reasons["_2"]


def test_foldable_batch_norms_lets_the_caller_erase_the_yielded_node() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)).eval())
    names = []
    for call in foldable_batch_norms(gm, {}):
        names.append(call.name)
        call.node.replace_all_uses_with(call.input)
        gm.graph.erase_node(call.node)
    assert names == ["0", "1"]
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "output"]


# ------------------------------------------------------------------------------------------------------ layers


class StandardisedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight - self.weight.mean(), self.bias)


class NamedConv(nn.Conv2d):
    """Changes nothing that computes: still a plain conv."""


def test_plain_layer_family_refuses_a_subclass_that_computes_otherwise() -> None:
    assert plain_layer_family(nn.Conv2d(1, 1, 1)) is nn.Conv2d
    assert plain_layer_family(NamedConv(1, 1, 1)) is nn.Conv2d
    assert plain_layer_family(nn.ConvTranspose1d(1, 1, 1)) is nn.ConvTranspose1d
    assert plain_layer_family(nn.Linear(1, 1)) is nn.Linear
    assert plain_layer_family(StandardisedConv(1, 1, 1)) is None
    assert plain_layer_family(nn.BatchNorm2d(1)) is None


class _KeepStandardisedConv(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, StandardisedConv) or super().is_leaf_module(m, qualname)


def test_producer_layer_only_for_module_calls_of_plain_layers() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1), StandardisedConv(1, 1, 1), nn.ReLU())
    gm = fx.GraphModule(model, _KeepStandardisedConv().trace(model))
    assert producer_layer(gm, _node(gm, "0")) is gm.get_submodule("0")
    assert producer_layer(gm, _node(gm, "1")) is None
    assert producer_layer(gm, _node(gm, "2")) is None
    assert producer_layer(gm, None) is None


def test_conv_padding_same_is_known_only_when_even() -> None:
    assert conv_padding(nn.Conv2d(1, 1, 3, padding="same")) == (1, 1)
    assert conv_padding(nn.Conv2d(1, 1, (2, 3), padding="same")) is None  # pads one side more
    assert conv_padding(nn.Conv2d(1, 1, 3, padding="valid")) == (0, 0)
    assert conv_padding(nn.Conv1d(1, 1, 3, padding=2)) == (2,)


# ------------------------------------------------------------------------------------------------------- ranks


class Ranks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = torch.flatten(x, 1)
        lin = self.fc(flat)
        viewed = x.view(2, 4, 1, 1, 1)
        partial = torch.flatten(x, 2)
        return flat, lin, viewed, partial, x


def test_tensor_rank_from_the_graph_alone() -> None:
    gm = fx.symbolic_trace(Ranks())
    ranks = {n.name: tensor_rank(gm, n) for n in gm.graph.nodes if n.op != "output"}
    assert ranks == {"x": None, "flatten": 2, "fc": 2, "view": 5, "flatten_1": None}


def test_tensor_rank_from_shape_metadata() -> None:
    gm = fx.symbolic_trace(Ranks())
    x = _node(gm, "x")
    x.meta["tensor_meta"] = type("Meta", (), {"shape": (2, 4, 1)})()
    assert tensor_rank(gm, x) == 3


def test_asserted_rank_reads_a_torch_assert_on_ndim() -> None:
    class Asserting(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._assert(x.ndim == 4, "4-D input expected")
            return x + 1

    gm = fx.symbolic_trace(Asserting())
    assert asserted_rank(_node(gm, "x")) == 4
    assert tensor_rank(gm, _node(gm, "x")) == 4
    assert asserted_rank(_node(gm, operator.add)) is None


# ----------------------------------------------------------------------------------------------------- readers


def test_value_users_ignores_readers_of_shape_only() -> None:
    class ShapeReader(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(x)
            return y.reshape(y.size(0), -1) + y.ndim

    gm = fx.symbolic_trace(ShapeReader())
    relu = _node(gm, torch.relu)
    assert sorted(u.name for u in relu.users) == ["getattr_1", "reshape", "size"]
    assert [u.name for u in value_users(relu)] == ["reshape"]


# -------------------------------------------------------------------------------------------------- arithmetic


class Arithmetic(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            x + y,
            torch.sub(x, y, alpha=2),
            x.mul(y),
            torch.div(x, y, rounding_mode="floor"),
            torch.add(x, y, alpha=float("inf")),
            torch.maximum(x, y),
        )


def test_arithmetic_operands_recognises_and_refuses() -> None:
    gm = fx.symbolic_trace(Arithmetic())
    x, y = _node(gm, "x"), _node(gm, "y")
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    found = [arithmetic_operands(n) for n in calls]
    assert found == [("add", x, y, 1.0), ("sub", x, y, 2.0), ("mul", x, y, 1.0), None, None, None]


# ------------------------------------------------------------------------------------------- writes and aliases


class Writes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = x + 1
        view = a.view(-1)
        b = a * 2  # reads a
        view.mul_(y)  # writes into a through its view
        c = a - 1
        self.act(c)
        return b + c


def test_written_inputs_sees_in_place_calls() -> None:
    gm = fx.symbolic_trace(Writes())
    view = _node(gm, "view")
    c = _node(gm, operator.sub)
    assert written_inputs(gm, _node(gm, "mul_")) == [view]
    assert written_inputs(gm, _node(gm, "act")) == [c]
    assert written_inputs(gm, _node(gm, operator.add)) == []


def test_written_between_finds_a_write_through_a_view() -> None:
    gm = fx.symbolic_trace(Writes())
    a = next(n for n in gm.graph.nodes if n.target is operator.add)
    times_two = _node(gm, operator.mul)
    minus_one = _node(gm, operator.sub)
    # moving a read of `a` from `a * 2` down to `a - 1` would see the in-place mul_ through the view
    assert written_between(gm, a, times_two, minus_one) is _node(gm, "mul_")
    assert written_between(gm, a, a, times_two) is None


def test_is_library_function() -> None:
    def user_function(t: torch.Tensor) -> torch.Tensor:
        return t

    assert is_library_function(torch.relu)
    assert is_library_function(operator.add)
    assert is_library_function(F.conv2d)
    assert not is_library_function(user_function)

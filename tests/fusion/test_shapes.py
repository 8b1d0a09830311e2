"""Shapes propagated through a traced graph only when a pass asks (fusion.shapes)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fx_lightning import fuse
from fx_lightning.fusion import shapes
from fx_lightning.fusion.passes.matching import tensor_rank, tensor_shape


def _traced() -> fx.GraphModule:
    return fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def _conv_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")


def test_deferred_shapes_are_propagated_on_the_first_question_only() -> None:
    gm = _traced()
    asked = []

    def inputs() -> tuple[torch.Tensor, ...]:
        asked.append(1)
        return (torch.randn(2, 3, 8, 8),)

    node = _conv_node(gm)
    with shapes.deferred(gm, inputs):
        assert asked == []  # deferring runs nothing
        assert tensor_shape(gm, node) == (2, 4, 6, 6)
        assert tensor_rank(gm, node) == 4
        assert asked == [1]
        assert shapes.ensure(gm) is False  # done once
    gm = _traced()
    with shapes.deferred(gm, inputs):
        pass
    assert shapes.ensure(gm) is False  # forgotten when the passes are done, asked or not
    assert asked == [1]
    assert tensor_rank(gm, _conv_node(gm)) is None


def test_shapes_stay_unknown_without_inputs_or_when_the_graph_cannot_run_on_them() -> None:
    gm = _traced()
    with shapes.deferred(gm, lambda: None):
        assert tensor_rank(gm, _conv_node(gm)) is None
    gm = _traced()
    with shapes.deferred(gm, lambda: (torch.randn(2, 5, 8, 8),)):  # 5 channels into a 3-channel conv
        assert tensor_shape(gm, _conv_node(gm)) is None


def test_propagate_raises_the_interpreter_s_cause() -> None:
    with pytest.raises(RuntimeError, match="expected input"):
        shapes.propagate(_traced(), (torch.randn(2, 5, 8, 8),))


class _LinearThenView(nn.Module):
    """A Linear whose output is viewed before BatchNorm1d: only propagated shapes show where its features land."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).reshape(x.shape[0], 4))


def test_a_fold_that_needs_shapes_still_gets_them_from_example_inputs() -> None:
    model = _LinearThenView().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 6)
    assert fuse(model).fusion_report.num_folded == 0  # rank unknown without inputs
    fused = fuse(model, example_inputs=(x,))
    assert fused.fusion_report.num_folded == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)

"""remove_dropout: eval-mode Dropout of every kind and Identity disappear from the graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fx_lightning.fusion.passes.remove_dropout import remove_dropout
from fx_lightning.fusion.tracing import detached_copy, trace


class FunctionalDropouts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, 0.5, training=False)
        x = F.dropout2d(x, 0.5, False)
        x = F.alpha_dropout(x, 0.5, training=self.training)
        return F.dropout(x, 0.5)  # training defaults to True: real dropout even in eval, kept


def _graph(model: nn.Module):
    gm = trace(detached_copy(model)).graph_module
    assert gm is not None
    return gm


def test_remove_dropout_every_module_kind() -> None:
    layers = [
        nn.Dropout(),
        nn.Dropout1d(),
        nn.Dropout2d(),
        nn.Dropout3d(),
        nn.AlphaDropout(),
        nn.FeatureAlphaDropout(),
        nn.Identity(),
    ]
    model = nn.Sequential(nn.Linear(3, 3), *layers).train()
    gm = _graph(model)
    result = remove_dropout(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert sorted(r.kind for r in result.removed) == sorted(type(m).__name__ for m in layers)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


def test_remove_dropout_functional_only_when_training_false() -> None:
    gm = _graph(FunctionalDropouts())
    result = remove_dropout(gm)
    gm.recompile()
    assert [r.kind for r in result.removed] == ["dropout", "dropout2d", "alpha_dropout"]
    remaining = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in remaining] == [F.dropout]


def test_remove_dropout_keeps_hooked_module() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout())
    model[1].register_forward_hook(lambda m, i, o: o + 1)
    gm = _graph(model)
    assert remove_dropout(gm).removed == []


def test_remove_dropout_stochastic_depth_in_eval() -> None:
    from torchvision.ops import StochasticDepth

    model = nn.Sequential(nn.Linear(3, 3), StochasticDepth(0.2, "row")).train()
    gm = _graph(model)

    def calls() -> list[str]:
        return [n.name for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth"]

    assert len(calls()) == 1  # torchvision wraps the function, so the eval-mode call is one node
    result = remove_dropout(gm)
    assert [r.kind for r in result.removed] == ["stochastic_depth"]
    assert calls() == []

"""tracing: the detached copy shares storage but no objects, and trace() keeps failing sub-modules opaque."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from engine_nets import DataDependentBlock, LibraryStyleNet, conv_bn
from fx_lightning import fuse
from fx_lightning.fusion.tracing import (
    LeafTracer,
    contains_batch_norm,
    detached_copy,
    is_builtin_batch_norm,
    trace,
)


def test_detached_copy_keeps_ties_and_shares_storage() -> None:
    shared = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(shared, nn.BatchNorm2d(2), shared).train()
    copy = detached_copy(model)
    assert copy[0] is copy[2]
    assert copy[0] is not shared
    assert copy[0].weight.data_ptr() == shared.weight.data_ptr()
    assert copy[1].running_mean.data_ptr() != model[1].running_mean.data_ptr()  # buffers are copied
    assert model.training
    assert not copy.training


def test_detached_copy_train_forward_leaves_caller_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    copy = detached_copy(model).train()
    copy(torch.randn(4, 2, 3, 3))
    assert torch.equal(model[1].running_mean, torch.zeros(2))


def test_is_builtin_batch_norm_distinguishes_overridden_forward() -> None:
    class Custom(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert is_builtin_batch_norm(nn.BatchNorm1d(2))
    assert is_builtin_batch_norm(nn.SyncBatchNorm(2))
    assert not is_builtin_batch_norm(Custom(2))
    assert not is_builtin_batch_norm(nn.LayerNorm(2))


def test_trace_makes_failing_submodule_opaque() -> None:
    result = trace(detached_copy(LibraryStyleNet()))
    assert result.graph_module is not None
    assert list(result.opaque) == ["mid"]
    assert "control flow" in result.opaque["mid"]
    assert any(n.op == "call_module" and n.target == "mid" for n in result.graph_module.graph.nodes)


class _Nested(nn.Module):
    """A block whose own code fails to trace after it called a layer, holding another such block."""

    def __init__(self, c: int, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.inner = inner if inner is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(self.conv(x))
        return y if y.mean() > 0 else -y  # control flow on a value: not traceable


def test_trace_finds_every_failing_submodule_in_one_trace_and_returns_a_clean_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(conv_bn(2, 2), _Nested(2), conv_bn(2, 2), _Nested(2, _Nested(2)), _Nested(2)).eval()
    traces = []
    plain = LeafTracer.trace

    def counted(self: LeafTracer, root: nn.Module, *args: Any, **kwargs: Any) -> Any:
        traces.append(self.recover)
        return plain(self, root, *args, **kwargs)

    monkeypatch.setattr(LeafTracer, "trace", counted)
    result = trace(detached_copy(model))
    # one trace that recovers in place from each failing block, one clean trace with them as leaves from the start
    assert traces == [True, False]
    assert sorted(result.opaque) == ["1", "3", "3.inner", "4"]  # as found one by one, innermost first
    gm = result.graph_module
    assert gm is not None
    # the nodes the failed calls made before failing (their conv calls) are not in the graph
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert {"1", "3", "4"} <= set(called)
    assert not [c for c in called if c[0] in "134" and c not in "134"]
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_trace_reports_root_failure() -> None:
    result = trace(detached_copy(DataDependentBlock(2)))
    assert result.graph_module is None
    assert "TraceError" in result.error


def test_trace_honours_leaf_types() -> None:
    model = nn.Sequential(conv_bn(2, 2), conv_bn(2, 2))
    gm = trace(detached_copy(model), leaf_types=(nn.Sequential,)).graph_module
    # the root itself is always traced; its Sequential children stay single calls
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_contains_batch_norm_sees_every_kind() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    class Custom(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)

    for bn in (nn.BatchNorm2d(2), Custom(2), FrozenBatchNorm2d(2)):
        assert contains_batch_norm(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(bn)))
    assert not contains_batch_norm(nn.Sequential(nn.Conv2d(2, 2, 1), nn.LayerNorm(2)))


class _Caching(nn.Module):
    """Caches a tensor per device key in a dict attribute, as timm's LeViT attention does in eval."""

    def __init__(self, shared: dict[str, object]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.cache = shared
        self.keys: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        self.keys.append(key)
        if key not in self.cache:
            self.cache[key] = self.conv.weight * 2
        return self.conv(x) * self.cache[key].sum()


def test_detached_copy_copies_attribute_containers_so_tracing_cannot_write_into_the_caller() -> None:
    shared: dict[str, object] = {}
    model = nn.Sequential(_Caching(shared), nn.BatchNorm2d(2), _Caching(shared)).eval()
    result = trace(detached_copy(model))
    assert result.graph_module is not None
    assert shared == {}  # the trace filled the copy's cache with a Proxy, not the caller's
    assert model[0].keys == []
    copy = detached_copy(model)
    assert copy[0].cache is copy[2].cache  # one shared dict stays one dict in the copy
    assert copy[0].cache is not shared


class _FastPath(nn.Module):
    """A fast path that raises where it is not available (on this device, in this build)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("no fused kernel here")


class _WithFallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fast = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _FastPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        try:
            return self.fast(x)
        except NotImplementedError:
            return x.relu()


def test_trace_follows_a_fallback_the_code_takes_when_a_sub_module_raises_on_its_own() -> None:
    # Only torch.fx's own errors (a Proxy used as a value) make a sub-module a leaf: an exception the module raises
    # itself is caught by its caller, as when it runs.
    result = trace(detached_copy(_WithFallback()))
    assert result.opaque == {}
    gm = result.graph_module
    assert gm is not None
    assert "fast" not in {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    x = torch.randn(2, 3, 8, 8)
    model = _WithFallback().eval()
    torch.testing.assert_close(fuse(model, form="graph")(x), model(x), rtol=1e-5, atol=1e-6)

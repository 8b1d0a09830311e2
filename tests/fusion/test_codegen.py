"""codegen: the fused forward reaches sub-modules by dict lookups, stays live, copyable, picklable and scriptable."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from benchmarking import count_python_calls
from fx_lightning import fuse
from fx_lightning.fusion.codegen import DirectSubmoduleCalls, attribute_chain, install_direct_calls, modules_lookup
from fx_lightning.testing import randomize_batch_norm
from reparam_models import mobileone_net


def _module_getattr_calls(fn: Callable[[], Any]) -> int:
    """How many times one call of ``fn`` enters ``nn.Module.__getattr__`` (the slow attribute fallback)."""
    return count_python_calls(fn, into=nn.Module.__getattr__)


def _fused_pair() -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = mobileone_net().eval()
    randomize_batch_norm(model)
    return model, fuse(model, form="graph"), torch.randn(2, 3, 16, 16)


def test_attribute_chain_matches_torch_fx_and_lookup_names_each_level() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Sequential(nn.ReLU())))
    assert f"{attribute_chain('self', '0.0')}(" in gm.code
    assert modules_lookup("self", "blocks.0.conv") == "self._modules['blocks']._modules['0']._modules['conv']"


def test_fused_forward_needs_no_more_attribute_fallbacks_than_the_hand_written_deploy_form() -> None:
    model, fused, x = _fused_pair()
    plain, deploy = fused.__prepare_scriptable__(), model.deploy()
    with torch.inference_mode():
        # Leaf modules' own forwards read self.weight through the fallback too: the deploy form sets the floor.
        floor = _module_getattr_calls(lambda: deploy(x))
        assert _module_getattr_calls(lambda: fused(x)) <= floor
        assert _module_getattr_calls(lambda: plain(x)) > floor + 20  # torch.fx's own code: getattr chains
        assert torch.equal(fused(x), plain(x))
    assert "getattr(self" not in fused.code
    assert "self._modules['blocks']._modules['0']" in fused.code


def test_fused_forward_calls_a_submodule_replaced_after_fusion() -> None:
    _, fused, x = _fused_pair()
    fused.head = nn.Identity()
    assert fused(x).shape == (2, 16)
    fused.add_submodule("head", nn.Linear(16, 3))
    assert fused(x).shape == (2, 3)


def test_fused_forward_survives_deepcopy_and_pickle() -> None:
    _, fused, x = _fused_pair()
    expected = fused(x)
    copied = copy.deepcopy(fused)
    assert "_modules[" in copied.code
    torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_fused_graph_module_scripts_with_torch_fx_code() -> None:
    # TorchScript rejects the Tensor annotations torch.fx copies from annotated forwards; Sequential has none.
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(nn.Sequential(block, nn.Conv2d(4, 4, 1)), nn.Flatten()).eval()
    randomize_batch_norm(model)
    fused, x = fuse(model, form="graph"), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in recent torch
        scripted = torch.jit.script(fused)
    torch.testing.assert_close(scripted(x), fused(x), rtol=0, atol=0)
    assert "_modules" not in fused.__prepare_scriptable__().code
    assert "_modules[" in fused.code  # the fused model itself is unchanged


def test_direct_calls_chain_after_an_existing_transformer() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Sequential(nn.ReLU())))
    gm.graph.on_generate_code(lambda _: lambda body: ["# checked\n", *body])
    install_direct_calls(gm)
    assert "# checked" in gm.code
    assert "self._modules['0']._modules['0'](" in gm.code
    install_direct_calls(gm)  # installing twice does not stack two rewrites
    transformer = gm.graph._codegen._body_transformer
    assert isinstance(transformer, DirectSubmoduleCalls)
    assert not isinstance(transformer.previous, DirectSubmoduleCalls)


def test_direct_calls_leave_other_fragments_alone() -> None:
    rewrite = DirectSubmoduleCalls(frozenset({"conv"}))
    body = ["# COUNTER: 0\n", "y = torch.relu(x)", "w = self.conv.weight", "z = self.conv(x)", ";  x = None\n"]
    assert rewrite(body) == [body[0], body[1], body[2], "z = self._modules['conv'](x)", body[4]]


def test_fused_forward_retraces_to_the_same_module_calls() -> None:
    _, fused, x = _fused_pair()
    retraced = fx.symbolic_trace(fused)
    assert [n.target for n in retraced.graph.nodes if n.op == "call_module"] == [
        n.target for n in fused.graph.nodes if n.op == "call_module"
    ]
    torch.testing.assert_close(retraced(x), fused(x), rtol=0, atol=0)


class _FunctionalConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, self.weight, padding=1)


def test_fused_forward_fetches_tensors_through_module_lookups() -> None:
    model = nn.Sequential(nn.Sequential(_FunctionalConv(3, 4), nn.BatchNorm2d(4)), _FunctionalConv(4, 2)).eval()
    randomize_batch_norm(model)
    fused, x = fuse(model, form="graph"), torch.randn(2, 3, 5, 5)
    assert "= self._modules['1'].weight\n" in fused.code
    assert "= self._modules['0']._modules['0'].weight_folded1\n" in fused.code
    torch.testing.assert_close(fused(x), fused.__prepare_scriptable__()(x), rtol=0, atol=0)
    fused.get_submodule("1").weight = nn.Parameter(torch.zeros(2, 4, 3, 3))  # read at every call
    assert torch.count_nonzero(fused(x)) == 0

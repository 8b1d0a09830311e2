"""``weights``: the state dict written (safetensors, else ``torch.save``) and loaded strictly into a wiped copy.

Outputs are compared with a float64 copy of the original network, relative to the output's scale (``rel_err``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from deploy_nets import EXAMPLE_BATCH, make_case
from fx_lightning.deploy.export import write_artifacts
from fx_lightning.deploy.formats import registered_exporters
from fx_lightning.deploy.formats.base import ExportJob, LoadContext
from fx_lightning.deploy.formats.weights import WEIGHTS, load_weights, weights_backend, write_weights
from numerics import rel_err

# float32 eager against a float64 reference on a 2-conv network: a few float32 roundings
TOLERANCE = 1e-5


def _float64_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).double().eval()(x.double())


def test_weights_written_and_loaded_back_compute_the_fused_network(tmp_path: Path) -> None:
    case = make_case()
    path = write_weights(ExportJob(case.fused, case.example), tmp_path / "model", {})
    assert path == tmp_path / "model.safetensors"
    runner = load_weights(path, LoadContext(case.fused))
    x = case.batches[1][0]
    with torch.no_grad():
        out = runner(x)
        assert torch.equal(out, case.fused(x))  # the same network, the same kernels
    assert rel_err(out, _float64_output(case.original, x)) <= TOLERANCE


def test_weights_loaded_copy_holds_the_file_values_not_the_module(tmp_path: Path) -> None:
    case = make_case()
    x = case.example[0]
    with torch.no_grad():
        expected = case.fused(x)
    path = write_weights(ExportJob(case.fused, case.example), tmp_path / "model", {})
    with torch.no_grad():
        for value in case.fused.parameters():
            value.add_(1.0)  # changed after writing: the loaded network must not see it
    runner = load_weights(path, LoadContext(case.fused))
    with torch.no_grad():
        assert torch.equal(runner(x), expected)
        assert not torch.equal(case.fused(x), expected)


def test_weights_file_missing_a_value_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    case = make_case()
    path = write_weights(ExportJob(case.fused, case.example), tmp_path / "model", {})
    state = load_file(str(path))
    removed = sorted(state)[0]
    del state[removed]
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: \"{removed}\""):
        load_weights(path, LoadContext(case.fused))


def test_weights_file_holds_plain_cpu_copies_of_tied_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first = nn.Linear(3, 3)
    net = nn.Sequential(first, nn.ReLU(), nn.Linear(3, 3)).eval()
    net[2].weight = first.weight  # tied: safetensors refuses shared storage unless the writer copies
    path = write_weights(ExportJob(net, (torch.randn(2, 3),)), tmp_path / "tied", {})
    state = load_file(str(path))
    assert torch.equal(state["0.weight"], state["2.weight"])
    assert all(t.device.type == "cpu" for t in state.values())
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(load_weights(path, LoadContext(net))(x), net(x))


def test_weights_torch_save_backend_round_trips(tmp_path: Path) -> None:
    save, load, suffix = weights_backend(".pt")
    assert suffix == ".pt"
    case = make_case()
    path = tmp_path / "model.pt"
    save({k: v.detach().clone() for k, v in case.fused.state_dict().items()}, path)
    runner = load_weights(path, LoadContext(case.fused))
    x = case.batches[2][0]
    with torch.no_grad():
        assert torch.equal(runner(x), case.fused(x))
    assert sorted(load(path)) == sorted(case.fused.state_dict())


def test_weights_backend_prefers_safetensors() -> None:
    assert weights_backend()[2] == ".safetensors"
    assert weights_backend(".safetensors")[2] == ".safetensors"


def test_weights_through_write_artifacts_runs_any_batch_size(tmp_path: Path) -> None:
    case = make_case()
    artifact = write_artifacts(case.fused, case.example, tmp_path, ["weights"])["weights"]
    assert artifact.path == tmp_path / "model.safetensors"
    assert artifact.batch_size is None  # a state dict is not traced with the example's shapes
    assert artifact.runtime == "torch eager, load_state_dict(strict=True)"
    runner = artifact.load(case.fused)
    for batch in (1, EXAMPLE_BATCH, 7):
        x = torch.randn(batch, 1, 6, 6)
        with torch.no_grad():
            out = runner(x)
        assert out.shape == (batch, 5)
        assert rel_err(out, _float64_output(case.original, x)) <= TOLERANCE


def test_weights_is_registered_untraced_without_options() -> None:
    assert registered_exporters()["weights"] is WEIGHTS
    assert WEIGHTS.traced is False
    assert WEIGHTS.check({}) == {}


def test_weights_option_is_refused_with_the_fix() -> None:
    with pytest.raises(
        ValueError,
        match=r"export options for 'weights' name unknown option\(s\) \['dtype'\]\. It takes no options\. "
        r"Pass e\.g\. options=\{'weights': \{\.\.\.\}\} with those keys only\.",
    ):
        WEIGHTS.check({"dtype": "float16"})

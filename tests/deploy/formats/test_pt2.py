"""``pt2``: the ``torch.export`` program saved, loaded back with ``torch.export.load`` and run as a function.

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
from fx_lightning.deploy.formats.pt2 import PT2, load_pt2, pt2_runtime, write_pt2
from numerics import rel_err

# the exported graph runs the same float32 kernels as eager: a few roundings against float64
TOLERANCE = 1e-5


def _float64_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).double().eval()(x.double())


def test_pt2_written_and_loaded_back_computes_the_fused_network(tmp_path: Path) -> None:
    case = make_case()
    path = write_pt2(ExportJob(case.fused, case.example), tmp_path / "model", {})
    assert path == tmp_path / "model.pt2"
    runner = load_pt2(path, LoadContext(case.fused))
    assert not isinstance(runner, nn.Module)  # a plain function: exported modules refuse .eval()
    x = case.example[0]
    with torch.no_grad():
        out = runner(x)
        assert rel_err(out, case.fused(x)) <= TOLERANCE
    assert rel_err(out, _float64_output(case.original, x)) <= TOLERANCE


def test_pt2_file_loads_with_torch_export_alone(tmp_path: Path) -> None:
    case = make_case()
    path = write_pt2(ExportJob(case.fused, case.example), tmp_path / "model", {})
    program = torch.export.load(path)
    convolutions = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    batch_norms = [n for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    assert (len(convolutions), len(batch_norms)) == (2, 0)  # the fused network was written, not the original
    x = case.example[0]
    with torch.no_grad():
        assert rel_err(program.module()(x), _float64_output(case.original, x)) <= TOLERANCE


def test_pt2_program_is_captured_once_per_job() -> None:
    case = make_case()
    job = ExportJob(case.fused, case.example)
    assert job.program("pt2") is job.program("onnx")


def test_pt2_with_fixed_shapes_keeps_the_example_batch(tmp_path: Path) -> None:
    case = make_case()
    artifact = write_artifacts(case.fused, case.example, tmp_path, ["pt2"])["pt2"]
    assert artifact.batch_size == EXAMPLE_BATCH
    assert artifact.runtime == pt2_runtime({})
    assert artifact.runtime.startswith("torch.export.load (torch ")
    assert "+" not in artifact.runtime  # the local build tag is left out
    x = case.batches[0][0][:EXAMPLE_BATCH]
    with torch.no_grad():
        assert rel_err(artifact.load(case.fused)(x), _float64_output(case.original, x)) <= TOLERANCE


def test_pt2_with_a_dynamic_batch_runs_other_batch_sizes(tmp_path: Path) -> None:
    case = make_case()
    artifact = write_artifacts(case.fused, case.example, tmp_path, ["pt2"], dynamic_batch=True)["pt2"]
    assert artifact.batch_size is None
    runner = artifact.load(case.fused)
    for batch in (2, EXAMPLE_BATCH, 10):
        x = torch.randn(batch, 1, 6, 6)
        with torch.no_grad():
            out = runner(x)
        assert out.shape == (batch, 5)
        assert rel_err(out, _float64_output(case.original, x)) <= TOLERANCE


class ValueBranch(nn.Module):
    """A branch on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_pt2_of_a_module_torch_export_cannot_capture_raises_with_the_fix(tmp_path: Path) -> None:
    job = ExportJob(ValueBranch(), (torch.randn(2, 3),))
    match = (
        r"torch\.export\.export could not capture ValueBranch: .+ \(full error above\)\. Export the other formats "
        r"with formats=\['weights'\], or make the forward exportable \(no branches on tensor values\)\."
    )
    with pytest.raises(RuntimeError, match=rf"\(formats=\['pt2'\]\): {match}") as info:
        write_pt2(job, tmp_path / "model", {})
    assert info.value.__cause__ is not None
    with pytest.raises(RuntimeError, match=match):  # kept from the first attempt, not captured again
        job.program("aoti")
    assert list(tmp_path.iterdir()) == []


def test_pt2_is_registered_traced_without_options() -> None:
    assert registered_exporters()["pt2"] is PT2
    assert PT2.traced is True
    assert PT2.check({}) == {}
    with pytest.raises(
        ValueError, match=r"export options for 'pt2' name unknown option\(s\) \['strict'\]\. It takes no"
    ):
        PT2.check({"strict": True})

"""scripts/fuse_cost.py: fuse seconds over one forward on whole models, BatchNorms left, errors, other fusers."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

import whole_models
from fx_lightning import count_kernels, fuse
from fx_lightning.verify.compare import compare_trees
from scripts_loader import load_script

script = load_script("fuse_cost.py")


def test_fuse_cost_rows_match_count_kernels_and_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cost.json"
    costs = script.main(["--models", "hf_resnet", "--repeats", "1", "--json", str(out), "--markdown"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| " + " | ".join(script.HEADER) + " |"
    row = lines[2][2:-2].split(" | ")
    assert len(row) == len(script.HEADER)
    assert lines[-1].startswith("| median |")

    data = json.loads(out.read_text())
    assert [d["model"] for d in data] == ["hf_resnet"] == [c.model for c in costs]
    record, ours = data[0], data[0]["fusers"]["fx_lightning.fuse"]
    built = whole_models.build("hf_resnet")
    fused = fuse(built.model, example_inputs=built.example_inputs)
    assert record["bn_kernels_before"] == record["bn_before"] == count_kernels(built.model, *built.example_inputs)
    assert ours["bn_kernels_after"] == ours["bn_after"] == count_kernels(fused, *built.example_inputs) == 0
    # One round: the ratio is that round's fuse seconds over its forward seconds.
    assert len(ours["seconds"]) == len(record["forward_seconds"]) == 1
    assert ours["ratio"] == pytest.approx(ours["seconds"][0] / record["forward_seconds"][0], rel=1e-12)
    assert ours["reverted"] == 0
    assert ours["exact"]
    assert ours["max_rel_output"] <= 1e-4
    assert ours["max_rel_parts"] == pytest.approx(ours["max_rel_output"], rel=1e-12)  # the output is its own part
    assert (row[0], row[3], row[4], row[5]) == ("hf_resnet", f"{ours['ratio']:.1f}", f"{record['bn_before']} -> 0", "0")
    # HF's forward is not traceable by torch.fx's symbolic_trace: the error is reported, not raised.
    assert data[0]["fusers"]["torch.fx fuse"]["error"].startswith("TraceError")
    assert row[8].startswith("fails (TraceError")


def _cost(model: str, ratio: float, fx_ratio: float | None = None) -> Any:
    fusers = {script.FUSE: script.FuserCost(seconds=[ratio], ratio=ratio, bn_after=0, exact=True)}
    fusers[script.FX_FUSE] = (
        script.FuserCost(error="TraceError: no")
        if fx_ratio is None
        else script.FuserCost(seconds=[fx_ratio], ratio=fx_ratio, bn_after=1, exact=True)
    )
    return script.ModelCost(model, [1.0], 2, 2, fusers)


def test_fuse_cost_summary_row_gives_median_and_max_ratio() -> None:
    costs = [_cost("a", 2.0, 0.5), _cost("b", 10.0), _cost("c", 4.0, 1.5)]
    rows = script.table_rows(costs)
    assert [r[0] for r in rows] == ["a", "b", "c", "median"]
    assert rows[-1][3] == "4.0 (max 10.0)"
    assert rows[-1][8] == "median 1.0x, max 1.5x (2 models)"
    assert rows[1][8] == "fails (TraceError: no)"
    assert rows[0][8] == "0.500 s, 0.5x, BN 1, exact"


def test_fuse_cost_rejects_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        script.main(["--models", "hf_resnet,resnet"])
    assert "--models hf_resnet,resnet: unknown ['resnet']; choose from" in capsys.readouterr().err


def test_fuse_cost_compares_fx_dict_output_with_ordered_dict() -> None:
    # torchvision's segmentation models return an OrderedDict; the GraphModule torch.fx generates returns a dict.
    class Segmenter(nn.Module):
        def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
            result = OrderedDict()
            result["out"] = x * 2
            return result

    x = torch.ones(2)
    reference, traced = Segmenter()(x), fx.symbolic_trace(Segmenter())(x)
    assert compare_trees(reference, traced).structure
    assert compare_trees(script._plain(reference), script._plain(traced)).passed


def test_fuse_cost_deploy_size_builds_inputs_at_deployed_side(monkeypatch: pytest.MonkeyPatch) -> None:
    sides: list[int | None] = []
    built = whole_models.build("hf_resnet")

    def measure(name: str, repeats: int, budget_s: float, side: int | None = None) -> Any:
        sides.append(side)
        return _cost(name, 1.0)

    monkeypatch.setattr(script, "measure", measure)
    script.main(["--models", "hf_resnet,yolo11n_detect", "--deploy-size", "--repeats", "1"])
    script.main(["--models", "hf_resnet", "--repeats", "1"])
    assert sides == [224, 640, None]
    # The builder takes the side: the deployed input is that many pixels a side, the small one as the tests use it.
    assert built.example_inputs[0].shape[-2:] == (64, 64)
    assert whole_models.build("hf_resnet", side=224).example_inputs[0].shape[-2:] == (224, 224)


def test_whole_models_deploy_sides_cover_every_model() -> None:
    assert set(whole_models.DEPLOY_SIDES) == set(whole_models.BUILDERS)
    assert all(
        side % 32 == 0 or name.endswith("mobilenet_v3_large") for name, side in whole_models.DEPLOY_SIDES.items()
    )


def test_whole_models_build_rejects_tiny_side() -> None:
    with pytest.raises(ValueError, match=r"whole_models.build\('hf_resnet', side=8\): expected a side of at least 32"):
        whole_models.build("hf_resnet", side=8)

"""scripts/timm_survey.py: one model per timm family, rows that add up, errors for bad options."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from scripts_loader import load_script


@pytest.fixture(scope="module")
def survey() -> ModuleType:
    return load_script("timm_survey.py")


def test_timm_survey_picks_one_small_model_per_family(survey) -> None:
    picks = survey.family_representatives(["resnet50", "resnet18", "resnet101", "vit_base_patch16_224", "repvgg_b1"])
    assert picks == [("resnet", "resnet18"), ("repvgg", "repvgg_b1")]  # vit is skipped: no BatchNorm


def test_timm_survey_reports_a_model(survey, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        code = survey.main(["--models", "repvgg_a0", "--json", str(tmp_path / "t.json")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    (row,) = json.loads((tmp_path / "t.json").read_text())
    assert (row["bn_before"], row["bn_after"], row["conv_before"], row["conv_after"]) == (61, 0, 44, 22)
    assert row["conv_deploy"] == 22
    assert row["error"] <= 1.5 * row["own_error"] + 1e-6
    assert "BatchNorm kernels 61 -> 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "resnet_18"], r"--models resnet_18: not timm model names"),
        (["--size", "0"], r"--size 0 --timeout 300: expected positive integers"),
    ],
)
def test_timm_survey_rejects_bad_options(survey, argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        survey.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

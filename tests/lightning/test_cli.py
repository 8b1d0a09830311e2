"""The ``fx-lightning`` command and every file in configs/: they run as written (with tiny limits) and round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fx_lightning import FuseOnExport
from fx_lightning.lightning.callback import is_fused
from fx_lightning.lightning.cli import run

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

#: ResNet-18 is the slow one on a CPU: smaller batches, one verification batch, weights only and only after fit
#: (the digits run covers the .pt2 export).
FASTER = {
    "resnet18_finetune.yaml": [
        "--data.init_args.batch_size=16",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks.init_args.max_verify_batches=1",
        "--trainer.callbacks.init_args.export_stages=[fit]",
        "--trainer.callbacks.init_args.export_formats=[weights]",
    ],
    # The int8 plumbing on a barely trained network: a loose budget (tests/deploy/int8/test_int8.py runs it as written).
    "resnet18_int8.yaml": [
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks.init_args.int8={formats: [onnx], calibration_batches: 2, max_metric_drop: 1.0}",
        "--trainer.callbacks.init_args.deploy_latency_budget=0.1",
    ],
    # The AOTInductor compile is the slow part: tests/lightning/test_callback_deploy.py runs this config as written.
    "digits_deploy.yaml": [
        "--trainer.callbacks.init_args.export_formats=[pt2,onnx,weights]",
        "--trainer.callbacks.init_args.export_stages=[fit]",
    ],
}
FORMATS = {
    "resnet18_finetune.yaml": {"weights"},
    "digits_deploy.yaml": {"pt2", "onnx", "weights"},
    "resnet18_int8.yaml": {"onnx", "onnx-int8", "ckpt"},
}


def print_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_cli_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"digits.yaml", "resnet18_finetune.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_cli_config_fits_fuses_and_tests_fused(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the configs write under runs/, relative to the working directory
    cli: Any = run(["fit", "--config", str(config), *TINY, *FASTER.get(config.name, [])])
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FuseOnExport))
    assert [h["stage"] for h in callback.history] == ["fit", "test"]
    assert [h["outcome"] for h in callback.history] == ["fused", "fused"]
    assert all(h["verification"]["passed"] for h in callback.history)
    assert callback.history[1]["ckpt_path"] == cli.trainer.checkpoint_callback.best_model_path
    assert "test_acc" in cli.trainer.callback_metrics
    assert not is_fused(cli.model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in cli.model.net.modules())  # the user's own network
    fit = callback.history[0]
    report = Path(fit["report_path"])
    assert report.is_file()
    assert report.resolve().is_relative_to(tmp_path.resolve())  # under trainer.log_dir
    assert set(fit["artifacts"]) == FORMATS.get(config.name, {"pt2", "weights", "ckpt"})
    assert all(Path(entry["path"]).is_file() for entry in fit["artifacts"].values())
    assert all(entry["verification"]["passed"] for entry in fit["artifacts"].values())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_cli_print_config_round_trips(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = print_config(["fit", "--config", str(config), "--print_config"], capsys)
    printed = yaml.safe_load(first)
    fuse = next(cb for cb in printed["trainer"]["callbacks"] if cb["class_path"].endswith("FuseOnExport"))
    assert fuse["init_args"]["metric"]["class_path"].startswith("torchmetrics.")
    (tmp_path / "printed.yaml").write_text(first)
    second = print_config(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"], capsys)
    assert second == first


def test_cli_defaults_to_digits_example(capsys: pytest.CaptureFixture[str]) -> None:
    printed = yaml.safe_load(print_config(["fit", "--print_config"], capsys))
    assert printed["model"]["class_path"] == "fx_lightning.examples.models.DigitsCNN"
    assert printed["data"]["class_path"] == "fx_lightning.examples.data.DigitsDataModule"
    assert printed["test_after_fit"] is True


def test_cli_console_script_exits_zero(tmp_path: Path) -> None:
    # The installed `fx-lightning` command: a console script exits with main()'s return value.
    script = "import sys; from fx_lightning.lightning.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", script, "fit", "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_path: fx_lightning.examples.models.DigitsCNN" in done.stdout

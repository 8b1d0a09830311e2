"""scripts/finetune.py: fine-tunes ResNet-18 on the digits, tests it fused and exports it (tiny run)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from scripts_loader import load_script


def test_finetune_script_from_local_weights_exports_fused(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)  # 1000-class head: skipped
    args = ["--weights", str(weights), "--freeze-backbone", "--epochs", "1", "--batch-size", "16"]
    args += ["--limit-train-batches", "2", "--limit-eval-batches", "2", "--max-verify-batches", "1"]
    args += ["--export-formats", "weights"]
    callback = load_script("finetune.py").main([*args, "--out", str(tmp_path / "run")])
    stages = [h["stage"] for h in callback.history]
    assert stages == ["fit", "test"]
    assert all(h["outcome"] == "fused" for h in callback.history)
    assert callback.last_result.num_folded == 20  # every BatchNorm of ResNet-18
    assert Path(callback.last_result.artifacts["weights"]).parent == tmp_path / "run" / "fused"
    assert (tmp_path / "run" / "fused" / "fuse_report.json").is_file()

"""scripts/fuse_demo.py fuses a torchvision model and prints the report, kernel counts and the error."""

from __future__ import annotations

import re
import subprocess
import sys

from scripts_loader import SCRIPTS


def test_fuse_demo_prints_report_kernels_and_error() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "fuse_demo.py"), "--model", "resnet18", "--size", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ResNet: folded 20 BatchNorm, left 0" in done.stdout
    assert "batch-norm kernels run: 20 before, 0 after" in done.stdout
    error = float(re.search(r"max relative error vs the unfused model: (\S+)", done.stdout).group(1))
    assert error <= 1e-5

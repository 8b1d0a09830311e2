"""scripts/verification_cost.py measures a validation epoch and the callback's steps on the same data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fx_lightning.data import DigitsDataModule
from fx_lightning.models import DigitsCNN

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "verification_cost.py"


def test_verification_cost_measure_reports_each_step() -> None:
    spec = importlib.util.spec_from_file_location("verification_cost_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    timings = module.measure(DigitsCNN(width=4), DigitsDataModule(), repeats=1, formats=["weights"])
    assert set(timings) >= {"validation epoch", "fuse", "verify", "export"}
    assert all(value > 0 for value in timings.values())

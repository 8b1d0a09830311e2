"""scripts/verification_cost.py measures a validation epoch and the callback's steps on the same data."""

from __future__ import annotations

from fx_lightning.examples.data import DigitsDataModule
from fx_lightning.examples.models import DigitsCNN
from scripts_loader import load_script


def test_verification_cost_measure_reports_each_step() -> None:
    script = load_script("verification_cost.py")
    timings = script.measure(DigitsCNN(width=4), DigitsDataModule(), repeats=1, formats=["weights"])
    assert set(timings) >= {"validation epoch", "fuse", "verify", "export"}
    assert all(value > 0 for value in timings.values())

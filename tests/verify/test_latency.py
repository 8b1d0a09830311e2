"""measure_latency: interleaved rounds within a budget, medians and per-round ratios to the reference."""

from __future__ import annotations

import time

import pytest
import torch

from fx_lightning.verify.latency import measure_latency


def test_measure_latency_orders_a_slower_variant_after_the_reference() -> None:
    calls = {"fast": 0, "slow": 0}

    def fast() -> None:
        calls["fast"] += 1

    def slow() -> None:
        calls["slow"] += 1
        time.sleep(0.002)

    out = measure_latency({"fast": fast, "slow": slow}, "fast", budget_s=0.05, warmup=1, min_rounds=3)
    assert list(out) == ["fast", "slow"]
    assert out["fast"].ratio == 1.0
    assert out["slow"].ratio > 5  # 2 ms against a no-op
    assert out["slow"].median_ms >= 2.0
    assert out["slow"].calls_per_sample == 1
    assert out["fast"].calls_per_sample > 1  # repeated until a sample lasts 1 ms
    assert out["fast"].rounds == out["slow"].rounds >= 3
    assert calls["slow"] == 1 + 1 + out["slow"].rounds  # warmup, calibration, one call per round


def test_measure_latency_runs_without_grad() -> None:
    seen = []
    measure_latency({"a": lambda: seen.append(torch.is_grad_enabled())}, "a", budget_s=0.0, min_rounds=1)
    assert seen
    assert not any(seen)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference": "b"}, r"measure_latency\(reference='b'\) is not one of the variants \['a'\]"),
        ({"budget_s": -1.0}, r"needs budget_s >= 0 and 1 <= min_rounds <= max_rounds"),
        ({"min_rounds": 5, "max_rounds": 2}, r"measure_latency\(budget_s=1.0, min_rounds=5, max_rounds=2\) needs"),
    ],
)
def test_measure_latency_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    call = {"variants": {"a": lambda: None}, "reference": "a"} | kwargs
    with pytest.raises(ValueError, match=match):
        measure_latency(**call)

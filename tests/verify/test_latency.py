"""measure_latency: interleaved rounds within a budget, medians and per-round ratios to the reference."""

from __future__ import annotations

import time

import pytest
import torch

from fx_lightning.verify.latency import balanced_orders, measure_latency, time_calls


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


def test_measure_latency_orders_rounds_by_balanced_orders() -> None:
    order: list[str] = []
    variants = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    out = measure_latency(variants, "a", budget_s=0.0, warmup=0, min_rounds=6, max_rounds=6, min_sample_s=0.0)
    assert out["a"].rounds == 6
    timed = order[3:]  # after one calibration call each
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert rounds == [[["a", "b", "c"][i] for i in row] for row in balanced_orders(3)]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_balanced_orders_balance_first_place_and_predecessors(n: int) -> None:
    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    assert len({sum(order[0] == v for order in orders) for v in range(n)}) == 1
    pairs = [(a, b) for order in orders for a, b in zip(order, order[1:])]
    assert len(set(pairs)) == n * (n - 1)
    assert len({pairs.count(p) for p in set(pairs)}) == 1


def test_time_calls_averages_over_calls() -> None:
    assert time_calls(lambda: time.sleep(0.001), 4) >= 0.001  # each call sleeps 1 ms
    assert time_calls(lambda: None, 1000, torch.device("cpu")) < 1e-3


def test_measure_latency_errors_name_the_caller() -> None:
    with pytest.raises(ValueError, match=r"^interleaved_timings\(reference='x'\) is not one of the variants"):
        measure_latency({"a": lambda: None}, "x", owner="interleaved_timings")
    with pytest.raises(ValueError, match=r"^interleaved_timings\(budget_s=1.0, min_rounds=0, max_rounds=5\) needs 1"):
        measure_latency({"a": lambda: None}, "a", min_rounds=0, max_rounds=5, owner="interleaved_timings")

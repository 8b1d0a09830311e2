"""Median latency of several callables measured side by side, in interleaved rounds within a time budget.

Each round calls every variant once (a sample may repeat a fast call so that it lasts long enough to time),
in an order that rotates from round to round, so that drift of a shared machine hits every variant alike. The
ratio of a variant to the reference is the median over rounds of the two samples of the same round.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Latency:
    """The latency of one variant.

    Attributes:
        median_ms: median time of one call over the rounds, in milliseconds.
        ratio: median over rounds of (this variant's time / the reference's time in the same round).
        rounds: timed rounds.
        calls_per_sample: calls averaged in each timed sample.
        samples: the time of one call in each round, in seconds, in round order.
    """

    median_ms: float
    ratio: float
    rounds: int
    calls_per_sample: int
    samples: tuple[float, ...] = field(default=(), repr=False)

    def ratio_to(self, other: Latency) -> float:
        """Median over rounds of (this variant's time / ``other``'s time in the same round).

        Raises:
            ValueError: if the two were not timed in the same rounds.
        """
        if not self.samples or len(self.samples) != len(other.samples):
            raise ValueError(
                f"Latency.ratio_to: {len(self.samples)} and {len(other.samples)} samples; both variants must come "
                "from the same measure_latency call."
            )
        return statistics.median(s / o for s, o in zip(self.samples, other.samples))


def measure_latency(
    variants: Mapping[str, Callable[[], Any]],
    reference: str,
    *,
    budget_s: float = 1.0,
    warmup: int = 2,
    min_rounds: int = 3,
    max_rounds: int = 1000,
    min_sample_s: float = 1e-3,
) -> dict[str, Latency]:
    """Time every variant in interleaved rounds, on the current torch thread count, under ``torch.no_grad()``.

    Args:
        variants: name -> a callable running one forward pass on inputs prepared in advance.
        reference: the variant ratios are taken against (the unfused network).
        budget_s: wall time the timed rounds aim at (at least ``min_rounds`` rounds run, whatever it costs).
        warmup: untimed calls per variant first (compiled runtimes prepare on their first calls).
        min_rounds: fewest timed rounds.
        max_rounds: most timed rounds.
        min_sample_s: shortest duration of one timed sample; faster calls are repeated within a sample.

    Returns:
        name -> :class:`Latency`, in the order of ``variants``.

    Raises:
        ValueError: if ``reference`` is not a variant, or a limit is out of range.

    Example:
        >>> out = measure_latency({"a": lambda: None, "b": lambda: None}, "a", budget_s=0.01)
        >>> sorted(out), out["a"].ratio
        (['a', 'b'], 1.0)
    """
    if reference not in variants:
        raise ValueError(
            f"measure_latency(reference={reference!r}) is not one of the variants {list(variants)}. "
            "Pass the name of the variant to compare against."
        )
    if not (isinstance(budget_s, (int, float)) and budget_s >= 0) or not 1 <= min_rounds <= max_rounds:
        raise ValueError(
            f"measure_latency(budget_s={budget_s!r}, min_rounds={min_rounds!r}, max_rounds={max_rounds!r}) needs "
            "budget_s >= 0 and 1 <= min_rounds <= max_rounds."
        )
    names = list(variants)
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                variants[name]()
        one_call = {name: _seconds(variants[name], 1) for name in names}
        calls = {name: max(1, math.ceil(min_sample_s / max(one_call[name], 1e-9))) for name in names}
        round_s = sum(calls[name] * one_call[name] for name in names)
        rounds = min(max_rounds, max(min_rounds, int(budget_s / max(round_s, 1e-9))))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                samples[name].append(_seconds(variants[name], calls[name]))
    return {
        name: Latency(
            median_ms=statistics.median(samples[name]) * 1e3,
            ratio=statistics.median(s / ref for s, ref in zip(samples[name], samples[reference])),
            rounds=rounds,
            calls_per_sample=calls[name],
            samples=tuple(samples[name]),
        )
        for name in names
    }


def _seconds(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls

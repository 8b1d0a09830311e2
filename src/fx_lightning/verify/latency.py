"""Median latency of several callables measured side by side, in interleaved rounds within a time budget.

Each round calls every variant once (a sample may repeat a fast call so that it lasts long enough to time), in an
order that changes from round to round (:func:`balanced_orders`: each variant runs first, and right after each
other, equally often), so that drift of a shared machine hits every variant alike. The ratio of a variant to the
reference is the median over rounds of the two samples of the same round. On CUDA the calls are timed with CUDA
events (:func:`time_calls`). ``scripts/benchmarking.py`` times its variants with the same function.
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
    device: torch.device | None = None,
    owner: str = "measure_latency",
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
        device: where the variants run: on CUDA they are timed with CUDA events; ``None`` (or another device):
            with ``time.perf_counter``.
        owner: the function the user called, which error messages name.

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
            f"{owner}(reference={reference!r}) is not one of the variants {list(variants)}. "
            "Pass the name of the variant to compare against."
        )
    budget_ok = isinstance(budget_s, (int, float)) and budget_s >= 0
    if not budget_ok or not 1 <= min_rounds <= max_rounds:
        needs = ("budget_s >= 0 and " if not budget_ok else "") + "1 <= min_rounds <= max_rounds"
        raise ValueError(
            f"{owner}(budget_s={budget_s!r}, min_rounds={min_rounds!r}, max_rounds={max_rounds!r}) needs {needs}."
        )
    names = list(variants)
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                variants[name]()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        one_call = {name: time_calls(variants[name], 1, device) for name in names}
        calls = {name: max(1, math.ceil(min_sample_s / max(one_call[name], 1e-9))) for name in names}
        round_s = sum(calls[name] * one_call[name] for name in names)
        rounds = min(max_rounds, max(min_rounds, int(budget_s / max(round_s, 1e-9))))
        samples: dict[str, list[float]] = {name: [] for name in names}
        orders = balanced_orders(len(names))
        for r in range(rounds):
            for i in orders[r % len(orders)]:
                samples[names[i]].append(time_calls(variants[names[i]], calls[names[i]], device))
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


def time_calls(fn: Callable[[], Any], calls: int, device: torch.device | None = None) -> float:
    """The mean wall time in seconds of ``calls`` calls of ``fn``.

    On CUDA the calls are bracketed by CUDA events and the end event is synchronised, so that the time covers the
    kernels, not only their launch; elsewhere ``time.perf_counter`` is used.

    Example:
        >>> time_calls(lambda: None, 10) < 1.0
        True
    """
    if device is not None and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` variants in which each runs first equally often and right after each other equally often.

    A plain rotation would keep every variant's predecessor fixed (what it leaves in caches, how much of the turbo
    budget it used); these are the rows of a Williams Latin square, which balances both. For odd ``n`` the square's
    rows are followed by their reverses.

    Example:
        >>> balanced_orders(4)
        [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    """
    first = [0]
    for k in range(1, n):
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    rows = [[(v + r) % n for v in first] for r in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]

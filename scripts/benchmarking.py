"""Measuring helpers for ``scripts/benchmark.py``: interleaved latency, fusion cost, and the folding limit.

Everything here works on plain ``nn.Module`` objects and callables, without Lightning, so it can time any
inference variant (eager, fused, compiled, ONNX Runtime) the same way:

* :func:`interleaved_timings` runs every variant once per round, in balanced orders, so that machine drift (other
  processes, frequency scaling) hits all variants alike; ratios are taken within a round and their median
  reported. It is :func:`fx_lightning.verify.latency.measure_latency` (which also provides :func:`time_calls`
  and :func:`balanced_orders`), its results in milliseconds.
* :func:`bn_to_identity` builds the speed limit of folding: the same network with every BatchNorm
  replaced by ``nn.Identity`` (what a perfect fold would cost, minus nothing).
* :func:`time_fusers` times the fusers on one model, interleaved; :func:`measure_fusion` runs one fuser
  on one torchvision model in a fresh Python process and reports its peak and retained extra memory
  from ``/proc/self/status``.

The scripts import it as ``benchmarking`` (a script's own directory is on ``sys.path``), and so do the tests
(``pythonpath`` in ``pyproject.toml``). The file is also the entry point of that fresh process:
``python scripts/benchmarking.py probe ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fx_lightning.fusion.counting import count_ops
from fx_lightning.verify.latency import (  # time_calls and balanced_orders: fuse_cost.py imports them from here
    balanced_orders,
    measure_latency,
    time_calls,  # noqa: F401
)

FUSERS = ("fx_lightning.fuse", "torch.fx fuse")
"""Names of the fusers :func:`measure_fusion` knows, in the order the benchmark reports them."""

MEMORY_METHOD = (
    "Fusion time is the median wall time of repeated fusions in the benchmark process, the fusers interleaved "
    "(after one untimed warm-up each). Fusion memory is measured in a fresh Python process per (model, fuser): "
    "the model is built and its BatchNorm statistics randomised, both fusers are warmed up on a tiny conv+BN "
    "net (so code loading is not counted), freed heap is returned to the OS (gc + malloc_trim, and "
    "MALLOC_MMAP_THRESHOLD_=65536 so that every block above 64 KiB is its own mapping, given back when freed), "
    "then VmRSS is read as the baseline, the peak-RSS counter is reset (echo 5 > /proc/self/clear_refs) and the "
    "fuser runs once. peak extra = VmHWM - baseline; retained RSS = VmRSS after fusing (fused model alive) - "
    "baseline; retained tensors = bytes of the fused model's parameters and buffers whose storage is not shared "
    "with the original model. (That malloc setting makes every large temporary a fresh mapping, which slows "
    "fusion down, so the time is not taken in that process.)"
)


@dataclass
class VariantTiming:
    """Latency of one variant over the interleaved rounds.

    Attributes:
        median_ms: median time of one call, in milliseconds.
        ratio: median over rounds of (this variant's time / the reference variant's time in the same round).
        samples_ms: time of one call in each round (each sample averages ``iters_per_sample`` calls).
        iters_per_sample: calls per timed sample, chosen so that a sample lasts at least ``min_sample_s``.
    """

    median_ms: float
    ratio: float
    samples_ms: list[float] = field(default_factory=list)
    iters_per_sample: int = 1

    @property
    def iqr_ms(self) -> float:
        """Interquartile range of the per-round samples, in milliseconds (0 with fewer than 2 samples)."""
        if len(self.samples_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[2] - q[0]


def interleaved_timings(
    variants: dict[str, Callable[[], Any]],
    reference: str,
    device: torch.device,
    *,
    warmup: int = 3,
    min_rounds: int = 5,
    max_rounds: int = 30,
    budget_s: float = 10.0,
    min_sample_s: float = 0.05,
) -> dict[str, VariantTiming]:
    """Time every variant round by round, each round running all variants in a balanced order: the package's
    :func:`fx_lightning.verify.latency.measure_latency` with the benchmark's defaults, in milliseconds per round.

    The number of rounds adapts to the cost of one round: as many as fit in ``budget_s``, clamped to
    ``[min_rounds, max_rounds]``. Fast variants repeat their call within a sample so that timer
    resolution and per-sample overhead stay negligible.

    Args:
        variants: name -> callable running one forward pass; inputs prepared in advance.
        reference: the name of the variant ratios are taken against (the unfused eval model).
        device: where the variants run (selects the CUDA-event timer on CUDA).
        warmup: untimed calls per variant before calibration.
        min_rounds: fewest rounds, whatever the budget.
        max_rounds: most rounds, whatever the budget.
        budget_s: target wall time of the timed rounds.
        min_sample_s: shortest duration of one timed sample.

    Returns:
        name -> :class:`VariantTiming`, in the order of ``variants``.

    Raises:
        ValueError: if ``reference`` is not one of ``variants`` or the round limits are inconsistent.

    Example:
        >>> out = interleaved_timings({"a": lambda: None, "b": lambda: None}, "a", torch.device("cpu"),
        ...                           warmup=1, min_rounds=2, max_rounds=2, min_sample_s=1e-4)
        >>> sorted(out), out["a"].ratio
        (['a', 'b'], 1.0)
    """
    timings = measure_latency(
        variants,
        reference,
        budget_s=budget_s,
        warmup=warmup,
        min_rounds=min_rounds,
        max_rounds=max_rounds,
        min_sample_s=min_sample_s,
        device=device,
        owner="interleaved_timings",
    )
    return {
        name: VariantTiming(
            median_ms=t.median_ms,
            ratio=t.ratio,
            samples_ms=[sample * 1e3 for sample in t.samples],
            iters_per_sample=t.calls_per_sample,
        )
        for name, t in timings.items()
    }


def paired_ratio_interval(
    samples: Sequence[float],
    reference: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap confidence interval of the median per-round ratio ``samples[i] / reference[i]``.

    Rounds are resampled with replacement (percentile bootstrap, fixed seed, so a report is reproducible from
    its samples). An interval that contains 1 means the two variants' latencies are equal within the noise of
    this run; one wholly below 1 means ``samples`` was faster in this run.

    Args:
        samples: one time per round of the variant of interest.
        reference: the time of the variant compared against, in the same rounds.
        confidence: probability mass of the interval, in (0, 1).
        resamples: number of bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: for empty or unequal-length samples, a non-positive time, or a confidence outside (0, 1).

    Example:
        >>> paired_ratio_interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
        (2.0, 2.0)
    """
    if not samples or len(samples) != len(reference):
        raise ValueError(
            f"paired_ratio_interval got {len(samples)} samples and {len(reference)} reference samples; "
            "pass one time per round for each, from the same rounds."
        )
    if min(*samples, *reference) <= 0:
        raise ValueError("paired_ratio_interval needs positive times; got a zero or negative one.")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_ratio_interval(confidence={confidence}) must lie strictly between 0 and 1.")
    ratios = [a / b for a, b in zip(samples, reference)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return medians[int(tail * (resamples - 1))], medians[math.ceil((1 - tail) * (resamples - 1))]


def count_python_calls(fn: Callable[[], Any], into: Callable[..., Any] | None = None) -> int:
    """Number of Python and builtin function calls one call of ``fn`` makes (``sys.setprofile`` events).

    Deterministic where wall time is not: on a busy machine it still shows per-call interpreter overhead,
    such as the attribute lookups a generated ``forward`` makes to reach its sub-modules. With ``into``,
    only calls of that Python function count (e.g. ``nn.Module.__getattr__``).
    """
    calls = 0
    code = into.__code__ if into is not None else None

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if (code is None and event in ("call", "c_call")) or (event == "call" and frame.f_code is code):
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return calls


def count_aten_ops(fn: Callable[[], Any]) -> int:
    """Number of ATen operators one call of ``fn`` dispatches (every kernel, whatever Python called it).

    Call it under ``torch.inference_mode()`` to count what inference runs (outside it, autograd adds ops).

    Example:
        >>> net, x = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), torch.ones(1, 1, 2, 2)
        >>> with torch.inference_mode():
        ...     count_aten_ops(lambda: net(x))  # conv2d, relu
        2
    """
    return count_ops(fn)


def bn_to_identity(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` in eval mode with every BatchNorm module replaced by ``nn.Identity``.

    This is the speed limit of folding: the same layers and call structure, minus every BatchNorm. It
    computes a different function, so compare its latency, never its output.

    Example:
        >>> limit = bn_to_identity(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
        >>> [type(m).__name__ for m in limit]
        ['Conv2d', 'Identity']
    """
    limit = copy.deepcopy(model).eval()
    for parent in list(limit.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(parent, name, nn.Identity())
    return limit


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(model)}
    return sum(storages.values())


def retained_extra_bytes(fused: nn.Module, original: nn.Module) -> int:
    """Bytes of the storages behind ``fused``'s parameters and buffers that ``original`` does not also use.

    Example:
        >>> net = nn.Linear(4, 4)
        >>> retained_extra_bytes(net, net), retained_extra_bytes(copy.deepcopy(net), net)
        (0, 80)
    """
    shared = {t.untyped_storage().data_ptr() for t in _tensors(original)}
    own = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in _tensors(fused)
        if t.untyped_storage().data_ptr() not in shared
    }
    return sum(own.values())


def proc_status_kib(*keys: str) -> dict[str, int]:
    """Read fields such as ``VmRSS``/``VmHWM`` (in KiB) from ``/proc/self/status``; missing fields are left out."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in keys:
                    values[key] = int(rest.split()[0])
    except OSError:
        return {}
    return values


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (``VmHWM``) to its current RSS; ``False`` where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _release_free_memory() -> None:
    gc.collect()
    # Outside glibc there is no malloc_trim: RSS may then include freed heap, which the baseline also includes.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class FusionCost:
    """Wall time and memory of one fuser on one model (see ``MEMORY_METHOD``).

    ``seconds`` come from :func:`time_fusers`, the byte counts from :func:`measure_fusion`; byte counts are
    ``None`` where the platform does not expose them (no ``/proc``, or no peak reset).
    """

    model: str
    fuser: str
    seconds: list[float]
    model_bytes: int
    retained_tensor_bytes: int
    peak_extra_bytes: int | None
    retained_rss_bytes: int | None
    error: str = ""

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data, with the median time added."""
        return {**asdict(self), "median_seconds": self.median_seconds}


def run_fuser(fuser: str, model: nn.Module) -> nn.Module:
    """Fuse an eval-mode ``model`` with the named fuser (one of :data:`FUSERS`)."""
    if fuser == "fx_lightning.fuse":
        from fx_lightning import fuse

        return fuse(model)
    from torch.fx.experimental.optimization import fuse as fx_fuse

    return fx_fuse(model)


def probe_fusion(model_name: str, fuser: str, threads: int = 2) -> FusionCost:
    """Build ``model_name`` in this process and measure the memory ``fuser`` uses on it, in a fresh process.

    Use :func:`measure_fusion`, which starts that process, rather than calling this directly.
    """
    import torchvision

    from fx_lightning.testing import randomize_batch_norm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with torch.no_grad():
        model = torchvision.models.get_model(model_name, weights=None).eval()
    randomize_batch_norm(model)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    for name in FUSERS:
        run_fuser(name, tiny)
    _release_free_memory()

    base = proc_status_kib("VmRSS").get("VmRSS")
    can_reset = reset_peak_rss()
    fused = run_fuser(fuser, model)
    peak = proc_status_kib("VmHWM").get("VmHWM")
    _release_free_memory()
    after = proc_status_kib("VmRSS").get("VmRSS")
    measured = base is not None and peak is not None and can_reset
    return FusionCost(
        model=model_name,
        fuser=fuser,
        seconds=[],
        model_bytes=tensor_bytes(model),
        retained_tensor_bytes=retained_extra_bytes(fused, model),
        peak_extra_bytes=(peak - base) * 1024 if measured else None,
        retained_rss_bytes=(after - base) * 1024 if base is not None and after is not None else None,
    )


def time_fusers(model: nn.Module, fusers: Sequence[str] = FUSERS, repeats: int = 3) -> dict[str, list[float]]:
    """Wall time in seconds of each fuser on ``model``, ``repeats`` times, interleaved in balanced orders.

    Each fuser runs once untimed first, so that one-off costs (imports, first-call caches) are not counted.

    Raises:
        ValueError: if a fuser is unknown or ``repeats`` is below 1.

    Example:
        >>> times = time_fusers(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval(), repeats=2)
        >>> {name: len(seconds) for name, seconds in times.items()}
        {'fx_lightning.fuse': 2, 'torch.fx fuse': 2}
    """
    unknown = [f for f in fusers if f not in FUSERS]
    if unknown or repeats < 1:
        raise ValueError(
            f"time_fusers(fusers={list(fusers)}, repeats={repeats}) expects fusers from {list(FUSERS)} "
            "and repeats >= 1."
        )
    for fuser in fusers:
        run_fuser(fuser, model)
    seconds: dict[str, list[float]] = {fuser: [] for fuser in fusers}
    orders = balanced_orders(len(fusers))
    for r in range(repeats):
        for i in orders[r % len(orders)]:
            gc.collect()
            begin = time.perf_counter()
            fused = run_fuser(fusers[i], model)
            seconds[fusers[i]].append(time.perf_counter() - begin)
            del fused
    return seconds


def measure_fusion(model_name: str, fuser: str, *, threads: int = 2, timeout_s: float = 600.0) -> FusionCost:
    """Measure the memory ``fuser`` uses on the torchvision model ``model_name`` (``weights=None``) in a fresh process.

    A fresh process per measurement keeps the memory figures free of what earlier work left in the heap.

    Args:
        model_name: a torchvision classification model name, e.g. ``"resnet50"``.
        fuser: one of :data:`FUSERS`.
        threads: ``torch.set_num_threads`` in the child process.
        timeout_s: give up on the child after this many seconds.

    Returns:
        A :class:`FusionCost` without times; on failure its ``error`` holds the child's message.

    Raises:
        ValueError: if ``fuser`` is not one of :data:`FUSERS`.
    """
    if fuser not in FUSERS:
        raise ValueError(f"measure_fusion(fuser={fuser!r}) is not a known fuser; choose one of {list(FUSERS)}.")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    # The child runs this file; the checkout's src/ comes first so that it fuses with the code beside it.
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "probe", model_name, fuser]
    cmd += ["--threads", str(threads)]
    empty = FusionCost(model_name, fuser, [], 0, 0, None, None)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        empty.error = f"timed out after {timeout_s:.0f}s"
        return empty
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        empty.error = f"probe exited with code {done.returncode}: {tail}"
        return empty
    data = json.loads(lines[-1])
    data.pop("median_seconds", None)
    return FusionCost(**data)


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or ``None`` where the platform has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a GitHub Markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [["1", "2"]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure one fuser on one torchvision model (used by measure_fusion).")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe")
    probe.add_argument("model")
    probe.add_argument("fuser", choices=FUSERS)
    probe.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cost = probe_fusion(args.model, args.fuser, args.threads)
    print(json.dumps(cost.to_dict()))


if __name__ == "__main__":
    _main()

"""Benchmark fused inference: the unfused eval model, ``fx_lightning.fuse``, torch.fx ``fuse`` and the floor.

All variants of one (model, batch size, dtype) are timed in this one process, round by round in a rotating
order, so machine drift hits them alike; ratios are medians of per-round ratios to the unfused eval model.
The floor is what a perfect fusion would run. For a torchvision model it is the "BN->Identity limit", the
same network with every BatchNorm replaced by ``nn.Identity``: no fold can be faster. For the
re-parameterisable test networks (``repvgg_net``, ``mobileone_net`` in ``tests/reparam_models.py``) it is
the architecture's "hand-written deploy" form, one convolution per block built by its own
``reparameterize()``. ``fuse / floor`` comes with a 95% bootstrap interval over the rounds: an interval
containing 1 means "the same latency within noise". Where available, ``torch.compile`` of the fused model
(``--compile``) and ONNX Runtime on an ONNX export of the fused model are timed too. Fusion wall time and
memory of each fuser are measured in a fresh process per torchvision model (see
``scripts/benchmarking.py``'s ``MEMORY_METHOD``).

    python scripts/benchmark.py --json benchmark.json --markdown benchmark.md --plot benchmark.png
"""

from __future__ import annotations

import os

# Must be set before torch loads OpenMP. With the default (spinning) wait policy, on a machine where other
# processes compete for the cores, every OpenMP barrier waits for a descheduled thread: measured here, a
# 2-thread resnet18 forward took 1.3 s instead of 33 ms. Waiting passively costs little on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import datetime
import difflib
import importlib.util
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from benchmarking import (
    FUSERS,
    MEMORY_METHOD,
    FusionCost,
    VariantTiming,
    bn_to_identity,
    count_aten_ops,
    count_python_calls,
    interleaved_timings,
    load_average,
    markdown_table,
    measure_fusion,
    paired_ratio_interval,
    time_fusers,
)
from fx_lightning import fuse
from fx_lightning.fusion.counting import count_ops
from fx_lightning.testing import randomize_batch_norm
from fx_lightning.verify.compare import relative_error

# The re-parameterisable networks live with the tests, so that the tests and this benchmark time identical models.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reparam_models import mobileone_net, repvgg_net  # noqa: E402

REPARAM_MODELS: dict[str, Callable[[], nn.Module]] = {"repvgg_net": repvgg_net, "mobileone_net": mobileone_net}

DEFAULT_MODELS = (
    "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "repvgg_net", "mobileone_net",
)  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EVAL = "eval"
OURS = "fx_lightning.fuse"
FX = "torch.fx fuse"
LIMIT = "BN->Identity limit"
DEPLOY = "hand-written deploy"
COMPILED = "torch.compile(fused)"
ORT = "ONNX Runtime (fused)"
# Relative output error above which a variant is flagged (the limit computes another function: not checked).
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class Options:
    """Validated command-line options."""

    models: list[str]
    batch_sizes: list[int]
    dtypes: list[str]
    device: torch.device
    size: int
    threads: int
    warmup: int
    min_rounds: int
    max_rounds: int
    budget_s: float
    fusion_repeats: int
    compile: bool
    onnx: bool
    fusion_cost: bool
    markdown: Path | None
    json: Path | None
    plot: Path | None
    quick: bool


@dataclass
class CaseResult:
    """Timings of all variants for one (model, batch size, dtype)."""

    model: str
    batch: int
    dtype: str
    timings: dict[str, VariantTiming]
    floor: str = LIMIT
    errors: dict[str, float] = field(default_factory=dict)
    work: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def paired_ratio(self, name: str, reference: str) -> float:
        """Median over rounds of ``name``'s time / ``reference``'s time in the same round."""
        a, b = self.timings[name].samples_ms, self.timings[reference].samples_ms
        return statistics.median(x / y for x, y in zip(a, b))

    def floor_interval(self) -> tuple[float, float]:
        """95% bootstrap interval of ``fx_lightning.fuse``'s time / the floor's, over the rounds."""
        return paired_ratio_interval(self.timings[OURS].samples_ms, self.timings[self.floor].samples_ms)

    def floor_verdict(self) -> str:
        """``same within noise`` when the interval contains 1, else ``faster`` or ``slower`` than the floor."""
        low, high = self.floor_interval()
        return "faster" if high < 1 else "slower" if low > 1 else "same within noise"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=None,
        help=f"torchvision names or {', '.join(REPARAM_MODELS)} [{' '.join(DEFAULT_MODELS)}]",
    )  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="batch sizes [1 8]")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help=f"any of {list(DTYPES)}")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--size", type=int, default=None, help="input height and width [224]")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and ONNX Runtime intra-op)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant [3]")
    parser.add_argument("--min-rounds", type=int, default=None, help="fewest interleaved rounds per case [5]")
    parser.add_argument("--max-rounds", type=int, default=None, help="most interleaved rounds per case [40]")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds, over all cases [150]")
    parser.add_argument("--fusion-repeats", type=int, default=None, help="timed fusions per model and fuser [3]")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the fused model (slow)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime even if it is installed")
    parser.add_argument("--no-fusion-cost", action="store_true", help="skip fusion time/memory measurement")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown report here")
    parser.add_argument("--json", type=Path, default=None, help="write all measurements as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here (needs matplotlib)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: resnet18, batch 1, 64x64, 3 rounds, 1 fusion repeat"
    )
    return parser


def validate(args: argparse.Namespace) -> Options:
    """Check the parsed options and fill the defaults (those of ``--quick`` when set).

    Raises:
        ValueError: for an unknown model, dtype or device, a non-positive number, or an unusable output path.
    """
    quick = bool(args.quick)
    models = args.models or (["resnet18"] if quick else list(DEFAULT_MODELS))
    known = [*torchvision.models.list_models(module=torchvision.models), *REPARAM_MODELS]
    for name in models:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"Did you mean {', '.join(close)}?" if close else f"Known models: {', '.join(sorted(known))}."
            raise ValueError(
                f"--models {name}: not a torchvision classification model nor one of {', '.join(REPARAM_MODELS)}. "
                f"{hint}"
            )
    batch_sizes = args.batch_sizes or ([1] if quick else [1, 8])
    for label, values in (("--batch-sizes", batch_sizes), ("--threads", [args.threads])):
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"{label} {' '.join(map(str, values))}: expected positive integers, got {bad}.")
    for dtype in args.dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"--dtypes {dtype}: unknown dtype; choose from {', '.join(DTYPES)}.")
    device = _device(args.device)
    if "float16" in args.dtypes and device.type == "cpu":
        raise ValueError("--dtypes float16 is only supported with --device cuda; on CPU use bfloat16.")
    defaults = {
        "size": 64 if quick else 224,
        "warmup": 1 if quick else 3,
        "min_rounds": 3 if quick else 5,
        "max_rounds": 3 if quick else 40,
        "budget": 1.0 if quick else 150.0,
        "fusion_repeats": 1 if quick else 3,
    }
    given = {key: getattr(args, key) for key in defaults}
    values = {key: defaults[key] if given[key] is None else given[key] for key in defaults}
    for key in ("size", "min_rounds", "max_rounds", "fusion_repeats"):
        if values[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} {values[key]}: expected a positive integer.")
    if values["warmup"] < 0 or values["budget"] < 0:
        raise ValueError(f"--warmup {values['warmup']} --budget {values['budget']}: expected non-negative numbers.")
    if values["min_rounds"] > values["max_rounds"]:
        raise ValueError(
            f"--min-rounds {values['min_rounds']} --max-rounds {values['max_rounds']}: min-rounds must not "
            "exceed max-rounds."
        )
    for label, path in (("--markdown", args.markdown), ("--json", args.json), ("--plot", args.plot)):
        if path is not None and path.exists() and path.is_dir():
            raise ValueError(f"{label} {path}: is a directory; pass a file path such as {path / 'benchmark.out'}.")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError(
            f'--plot {args.plot}: matplotlib is not installed. Install the plot extra: pip install "fx-lightning[plot]"'
        )
    return Options(
        models=models, batch_sizes=batch_sizes, dtypes=list(args.dtypes), device=device, size=values["size"],
        threads=args.threads, warmup=values["warmup"], min_rounds=values["min_rounds"],
        max_rounds=values["max_rounds"], budget_s=values["budget"], fusion_repeats=values["fusion_repeats"],
        compile=bool(args.compile), onnx=not args.no_onnx, fusion_cost=not args.no_fusion_cost,
        markdown=args.markdown, json=args.json, plot=args.plot, quick=quick,
    )  # fmt: skip


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"--device {spec}: not a device; use cpu, cuda, cuda:N or auto.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec}: only cpu and cuda are supported.")
    return device


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)


def _build(name: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    builder = REPARAM_MODELS.get(name)
    model = (builder() if builder else torchvision.models.get_model(name, weights=None)).eval()
    randomize_batch_norm(model)
    return model.to(device=device, dtype=dtype)


def _floor(name: str, model: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[str, nn.Module]:
    """The floor variant of ``model``: its hand-written deploy form if it has one, else the BN->Identity limit."""
    if name in REPARAM_MODELS:
        # The deploy form's own code folds in float32 on the CPU, as the architecture's authors run it.
        return DEPLOY, _build(name, torch.float32, torch.device("cpu")).deploy().to(device=device, dtype=dtype)
    return LIMIT, bn_to_identity(model)


def _export_onnx_session(fused: nn.Module, example: torch.Tensor, threads: int) -> Any:
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter prints progress to stdout, which carries the report.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            fused, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False, external_data=False
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_model(name: str, dtype_name: str, opts: Options, notes: list[str]) -> list[CaseResult]:
    """Build every variant of one model and dtype, then time them at each batch size."""
    dtype = DTYPES[dtype_name]
    model = _build(name, dtype, opts.device)
    fused = fuse(model)
    report = fused.fusion_report
    if report.skipped or report.untraced:
        notes.append(f"{name}: fx_lightning.fuse left {report.num_skipped} BatchNorm, untraced {len(report.untraced)}")
    floor, floor_net = _floor(name, model, dtype, opts.device)
    networks: dict[str, nn.Module] = {EVAL: model, OURS: fused, FX: fx_fuse(model), floor: floor_net}
    if opts.compile:
        networks[COMPILED] = torch.compile(fused)
    session = None
    if opts.onnx and _onnx_available(opts, dtype, notes):
        try:
            begin = time.perf_counter()
            example = torch.randn(2, 3, opts.size, opts.size, dtype=dtype)
            session = _export_onnx_session(fused.cpu(), example, opts.threads)
            fused.to(opts.device)
            log(f"  {name}: ONNX export + session in {time.perf_counter() - begin:.1f}s")
        except Exception as err:  # noqa: BLE001 - any export failure is reported, the rest still runs
            fused.to(opts.device)
            notes.append(f"{name} {dtype_name}: ONNX export failed ({type(err).__name__}: {str(err)[:200]})")

    results = []
    for batch in opts.batch_sizes:
        x = torch.randn(batch, 3, opts.size, opts.size, generator=torch.Generator().manual_seed(batch))
        x = x.to(device=opts.device, dtype=dtype)
        variants: dict[str, Callable[[], Any]] = {key: (lambda net=net: net(x)) for key, net in networks.items()}
        if session is not None:
            feed = {session.get_inputs()[0].name: x.cpu().numpy()}
            variants[ORT] = lambda feed=feed: session.run(None, feed)
        errors: dict[str, float] = {}
        with torch.inference_mode():
            reference = model(x)
            for key, call in list(variants.items()):
                if key in (EVAL, LIMIT):  # the limit computes another function
                    continue
                try:
                    begin = time.perf_counter()
                    out = call()
                    if key == COMPILED:
                        log(f"  {name} batch {batch}: torch.compile first call {time.perf_counter() - begin:.1f}s")
                except Exception as err:  # noqa: BLE001 - a failing optional variant is dropped and noted
                    notes.append(f"{name} batch {batch} {dtype_name}: {key} failed ({type(err).__name__}: {err})")
                    del variants[key]
                    continue
                out = out[0] if key == ORT else out
                errors[key] = relative_error(reference.double(), torch.as_tensor(out).to(reference.device).double())
                if errors[key] > _TOLERANCE[dtype]:
                    notes.append(f"{name} batch {batch} {dtype_name}: {key} relative error {errors[key]:.1e}")
            # Deterministic where timings are noisy: ATen ops and Python calls of one forward per variant.
            counted = (EVAL, OURS, FX, floor) if batch == opts.batch_sizes[0] else ()
            work = {
                k: (count_aten_ops(variants[k]), count_python_calls(variants[k]), count_ops(variants[k], "conv"))
                for k in counted
            }
            n_cases = len(opts.models) * len(opts.batch_sizes) * len(opts.dtypes)
            timings = interleaved_timings(
                variants, EVAL, opts.device, warmup=opts.warmup, min_rounds=opts.min_rounds,
                max_rounds=opts.max_rounds, budget_s=opts.budget_s / n_cases,
            )  # fmt: skip
        case = CaseResult(name, batch, dtype_name, timings, floor, errors, work)
        rounds = len(timings[EVAL].samples_ms)
        log(
            f"  {name} batch {batch} {dtype_name}: eval {timings[EVAL].median_ms:.2f} ms, "
            f"ours/{floor} {case.paired_ratio(OURS, floor):.3f}, ours/torch.fx {case.paired_ratio(OURS, FX):.3f} "
            f"({rounds} rounds)"
        )
        results.append(case)
    return results


def fusion_costs(name: str, opts: Options, notes: list[str]) -> list[FusionCost]:
    """Time both fusers on one model here, then measure their memory in fresh processes."""
    if name in REPARAM_MODELS:
        _note_once(notes, "fusion cost is measured for torchvision models only")
        return []
    log(f"fusion time of {name} ({opts.fusion_repeats} interleaved repeats) ...")
    seconds = time_fusers(_build(name, torch.float32, torch.device("cpu")), FUSERS, opts.fusion_repeats)
    costs = []
    for fuser in FUSERS:
        log(f"fusion memory of {fuser} on {name} (fresh process) ...")
        cost = measure_fusion(name, fuser, threads=opts.threads)
        cost.seconds = seconds[fuser]
        if cost.error:
            notes.append(f"{name}: fusion memory of {fuser} not measured: {cost.error}")
        costs.append(cost)
    return costs


def _onnx_available(opts: Options, dtype: torch.dtype, notes: list[str]) -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        _note_once(notes, 'ONNX Runtime not installed: skipped (pip install "fx-lightning[onnx]")')
        return False
    if opts.device.type != "cpu":
        _note_once(notes, "ONNX Runtime skipped on CUDA: the CPU session would be compared with GPU variants")
        return False
    if dtype != torch.float32:
        _note_once(notes, "ONNX Runtime timed for float32 only (its CPU kernels for bf16/fp16 conv are partial)")
        return False
    return True


def _note_once(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def latency_table(cases: Sequence[CaseResult]) -> str:
    """Markdown table: one row per case, one column per variant as ``ratio (median ms)``."""
    variants = _timed_variants(cases)
    header = ["model", "batch", "dtype", "eval (ms)", *variants, "fuse / floor [95%]", "vs floor", "fuse / torch.fx",
              "rounds"]  # fmt: skip
    rows = []
    for case in cases:
        row = [case.model, str(case.batch), case.dtype, f"{case.timings[EVAL].median_ms:.2f}"]
        for variant in variants:
            timing = case.timings.get(variant)
            row.append(f"{timing.ratio:.3f} ({timing.median_ms:.2f} ms)" if timing else "n/a")
        low, high = case.floor_interval()
        row += [f"{case.paired_ratio(OURS, case.floor):.3f} [{low:.3f}, {high:.3f}]", case.floor_verdict()]
        row.append(f"{case.paired_ratio(OURS, FX):.3f}")
        row.append(str(len(case.timings[EVAL].samples_ms)))
        rows.append(row)
    return markdown_table(header, rows)


def _timed_variants(cases: Sequence[CaseResult]) -> list[str]:
    return [v for v in (OURS, FX, LIMIT, DEPLOY, COMPILED, ORT) if any(v in c.timings for c in cases)]


def work_table(cases: Sequence[CaseResult]) -> str:
    """Markdown table: ATen ops, Python calls and convolutions of one forward of each torch variant."""
    rows = [
        [c.model, str(c.batch), c.dtype, *(" / ".join(map(str, c.work[v])) for v in (EVAL, OURS, FX, c.floor)), c.floor]
        for c in cases
        if c.work
    ]
    return markdown_table(["model", "batch", "dtype", EVAL, OURS, FX, "floor", "floor is"], rows)


def fusion_table(costs: Sequence[FusionCost]) -> str:
    """Markdown table: one row per (model, fuser) with its wall time and memory."""

    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.1f}"

    header = ["model", "fuser", "fusion time (s)", "peak extra (MiB)", "retained tensors (MiB)",
              "retained RSS (MiB)", "model tensors (MiB)"]  # fmt: skip
    rows = []
    for cost in costs:
        if cost.error:
            rows.append([cost.model, cost.fuser, f"{cost.median_seconds:.2f}", f"failed: {cost.error}", "", "", ""])
            continue
        rows.append([
            cost.model, cost.fuser, f"{cost.median_seconds:.2f}", mib(cost.peak_extra_bytes),
            mib(cost.retained_tensor_bytes), mib(cost.retained_rss_bytes), mib(cost.model_bytes),
        ])  # fmt: skip
    return markdown_table(header, rows)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu, "logical_cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
    }  # fmt: skip
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _load_text(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)


def render_markdown(result: dict[str, Any], cases: Sequence[CaseResult], costs: Sequence[FusionCost]) -> str:
    """The whole report: setup, latency table, fusion table, method and notes."""
    meta = result["meta"]
    machine = meta["machine"]
    lines = [
        "## Inference latency",
        "",
        f"`{meta['command']}` on {machine['cpu']} ({meta['device']}, {meta['threads']} threads, OMP_WAIT_POLICY="
        f"{meta['omp_wait_policy']}), torch "
        f"{machine['torch']}, torchvision {machine['torchvision']}, input {meta['size']}x{meta['size']}, "
        f"{meta['date']}. Load average before: {_load_text(meta['load_before'])}; after: "
        f"{_load_text(meta['load_after'])}.",
        "",
        "Each cell: median over interleaved rounds of the per-round time ratio to the unfused eval model "
        "(lower is faster), and the median latency. `fuse / floor` and `fuse / torch.fx` are paired ratios of "
        "fx_lightning.fuse to the floor (the BN->Identity limit, or the hand-written deploy form of a "
        "re-parameterisable network) and to torch.fx fuse; the brackets hold a 95% bootstrap interval over the "
        "rounds, and `vs floor` says whether it contains 1 (same within noise) or lies below (faster) or above "
        "(slower) it.",
        "",
        latency_table(cases),
    ]
    lines += [
        "",
        "## Work per forward",
        "",
        "ATen operators dispatched / Python function calls made / convolutions run by one forward pass "
        "(counted, not timed: the same on a busy machine). Python calls show interpreter overhead per layer.",
        "",
        work_table(cases),
    ]
    if costs:
        lines += ["", "## Fusion cost", "", fusion_table(costs), "", MEMORY_METHOD]
    if result["notes"]:
        lines += ["", "Notes:", "", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def write_plot(cases: Sequence[CaseResult], path: Path) -> None:
    """A grouped bar chart of latency ratios to the eval model, one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _timed_variants(cases)
    labels = [f"{c.model}\nb{c.batch} {c.dtype}" for c in cases]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cases)), 5.0))
    for i, variant in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(cases))]
        ys = [c.timings[variant].ratio if variant in c.timings else 0.0 for c in cases]
        ax.bar(xs, ys, width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)), labels, fontsize=8)
    ax.set_ylabel("latency / unfused eval model")
    ax.set_title("Inference latency relative to the unfused eval model (lower is faster)")
    ax.legend(fontsize=8, ncol=len(variants), loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = validate(args)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(opts.threads)
    load_before = load_average()
    started = time.perf_counter()
    notes: list[str] = []
    if opts.compile and opts.device.type == "cpu":
        notes.append("torch.compile timed after its first (compiling) call; compile time excluded")

    cases: list[CaseResult] = []
    for dtype_name in opts.dtypes:
        for name in opts.models:
            log(f"timing {name} {dtype_name} ...")
            cases += run_model(name, dtype_name, opts, notes)
    costs: list[FusionCost] = []
    if opts.fusion_cost:
        for name in opts.models:
            costs += fusion_costs(name, opts, notes)
        notes.append("fusion cost measured on CPU in float32, whatever --device and --dtypes say")

    result: dict[str, Any] = {
        "meta": {
            "command": "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(opts.device),
            "threads": opts.threads,
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "size": opts.size,
            "machine": _machine(),
            "load_before": load_before,
            "load_after": load_average(),
            "wall_seconds": time.perf_counter() - started,
            "memory_method": MEMORY_METHOD,
        },  # fmt: skip
        "cases": [
            {
                "model": c.model,
                "batch": c.batch,
                "dtype": c.dtype,
                "relative_error": c.errors,
                "work": {
                    k: {"aten_ops": ops, "python_calls": calls, "convolutions": convs}
                    for k, (ops, calls, convs) in c.work.items()
                },
                "floor": c.floor,
                "fuse_over_floor": c.paired_ratio(OURS, c.floor),
                "fuse_over_floor_interval": list(c.floor_interval()),
                "floor_verdict": c.floor_verdict(),
                "fuse_over_torch_fx": c.paired_ratio(OURS, FX),
                "variants": {
                    k: {
                        "median_ms": t.median_ms,
                        "ratio": t.ratio,
                        "iqr_ms": t.iqr_ms,
                        "samples_ms": t.samples_ms,
                        "iters_per_sample": t.iters_per_sample,
                    }
                    for k, t in c.timings.items()
                },
            }  # fmt: skip
            for c in cases
        ],
        "fusion": [c.to_dict() for c in costs],
        "notes": notes,
    }
    markdown = render_markdown(result, cases, costs)
    print(markdown)
    for path, text in ((opts.markdown, markdown), (opts.json, json.dumps(result, indent=2) + "\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if opts.plot is not None:
        write_plot(cases, opts.plot)
    log(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

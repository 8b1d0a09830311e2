"""What fusing a whole shipped model costs, in forwards of that model, and what it folds.

    python scripts/fuse_cost.py [--models a,b] [--deploy-size] [--threads 2] [--repeats 3] [--json out.json]
        [--markdown]

For each whole model of ``tests/whole_models.py`` (detectors, segmenters, YOLO, Hugging Face, smp, timm; built
without weights, BatchNorm statistics randomised): the seconds of ``fx_lightning.fuse(model, example_inputs=...)``
(as FuseOnExport calls it) and of one eager forward of the model on the same input, timed in interleaved rounds
(each round runs every variant once, in balanced orders, so that the shared machine's drift hits them alike), and
``ratio`` = the median over rounds of fuse seconds / forward seconds in the same round. Beside it: the BatchNorms
run per forward before and after (ATen ``batch_norm`` kernels plus calls of frozen BatchNorm modules, see
``fusion.counting.count_batch_norms``), the rewrites the self-check reverted, the largest relative error of the
whole output ("varies" where post-processed leaves change shape, e.g. detections after NMS) and of the continuous
parts (backbone features and head outputs for a detector; the output itself otherwise), each against the original
model in float32 (``fx_lightning.verify.compare.compare_trees``). Then the same for ``torch.fx``'s
``torch.fx.experimental.optimization.fuse`` and, on YOLO models, ultralytics' own ``model.fuse()`` (on a deep copy),
timed in the same rounds. The last row holds the median and the maximum of each ratio over the models.

By default each model runs on the builders' small inputs (one forward 5 ms to 0.2 s idle), which keep the tests
cheap but let the fixed Python work of tracing dominate the ratio. ``--deploy-size`` builds each model's input at
the size it is deployed at (``whole_models.DEPLOY_SIDES``: 224 for the classifiers and timm, 640 for YOLO
detect/segment and the ResNet-50 detectors, 320 for the MobileNet detectors and SSDlite, 520 for torchvision's
segmenters, 512 for smp), so that the ratio measures what a user pays.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The whole-model builders live with the tests; the script runs from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import whole_models  # noqa: E402
from benchmarking import balanced_orders, load_average, markdown_table, time_calls  # noqa: E402
from fx_lightning import count_kernels, fuse  # noqa: E402
from fx_lightning.errors import first_line  # noqa: E402
from fx_lightning.fusion.counting import count_batch_norms  # noqa: E402
from fx_lightning.verify.compare import Comparison, compare_trees  # noqa: E402

# The default list: whole detectors, segmenters, YOLO, Hugging Face and smp models; the FrozenBatchNorm2d detectors
# and the other third-party models are there too with --models all.
DEFAULT_MODELS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    "maskrcnn_resnet50_fpn_v2",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "yolo11n_detect",
    "yolo11n_segment",
    "yolo11n_classify",
    "hf_resnet",
    "hf_efficientnet",
    "smp_unet",
    "smp_unetplusplus",
)

FORWARD, FUSE, FX_FUSE, ULTRALYTICS_FUSE = "forward", "fx_lightning.fuse", "torch.fx fuse", "ultralytics fuse()"


@dataclass
class FuserCost:
    """One fuser on one model.

    Attributes:
        seconds: wall time of each timed call, one per round it ran in.
        ratio: median over rounds of (this fuser's seconds / the eager forward's seconds in the same round).
        error: the first line of the error where the fuser raised (nothing else is then measured).
        bn_after: BatchNorms per forward of the fused model (kernels plus frozen-module calls).
        bn_kernels_after: ATen ``batch_norm`` kernels per forward of the fused model (``count_kernels``).
        max_rel_output: largest relative error of the whole output's compared leaves (NaN when none compared).
        output_varies: some output leaves changed shape (post-processed detections), so were not compared.
        max_rel_parts: largest relative error of the continuous parts (NaN where they cannot be run on it).
        exact: every compared leaf of the parts and, unless post-processed, of the output within 1e-4 relative.
        reverted: rewrites the self-check reverted (``fusion_report.reverted``; fx_lightning only).
    """

    seconds: list[float] = field(default_factory=list)
    ratio: float = math.nan
    error: str = ""
    bn_after: int = -1
    bn_kernels_after: int = -1
    max_rel_output: float = math.nan
    output_varies: bool = False
    max_rel_parts: float = math.nan
    exact: bool = False
    reverted: int = 0

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan


@dataclass
class ModelCost:
    """Every figure measured on one whole model (see the module docstring)."""

    model: str
    forward_seconds: list[float]
    bn_before: int
    bn_kernels_before: int
    fusers: dict[str, FuserCost]

    @property
    def forward_median(self) -> float:
        return statistics.median(self.forward_seconds)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data, with the medians added."""
        data = asdict(self)
        data["forward_median"] = self.forward_median
        for name, cost in self.fusers.items():
            data["fusers"][name]["median_seconds"] = cost.median_seconds
        return data


@dataclass(frozen=True)
class _Fuser:
    """A fuser as timed: ``run(prepare())``, where only ``run`` is timed."""

    prepare: Callable[[], nn.Module]
    run: Callable[[nn.Module], nn.Module]


def _fusers(built: whole_models.WholeModel) -> dict[str, _Fuser]:
    model, inputs = built.model, built.example_inputs
    fusers = {
        FUSE: _Fuser(lambda: model, lambda m: fuse(m, example_inputs=inputs)),
        FX_FUSE: _Fuser(lambda: model, _fx_fuse),
    }
    if built.name in whole_models.ULTRALYTICS:
        # ultralytics' fuse() rewrites the model in place: it runs on a deep copy, made outside the timed call.
        fusers[ULTRALYTICS_FUSE] = _Fuser(lambda: copy.deepcopy(model), lambda m: m.fuse(verbose=False))
    return fusers


def _fx_fuse(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse as fx_fuse

    return fx_fuse(model)


def _timed(fuser: _Fuser) -> tuple[float, nn.Module]:
    """Seconds of one call of ``fuser`` and the fused model."""
    model = fuser.prepare()
    holder: dict[str, nn.Module] = {}
    seconds = time_calls(lambda: holder.setdefault("fused", fuser.run(model)), 1, torch.device("cpu"))
    return seconds, holder["fused"]


def _plain(tree: Any) -> Any:
    """``tree`` with every ``OrderedDict`` as a plain ``dict``: torch.fx's generated code returns a ``dict`` where
    the traced forward built an ``OrderedDict`` (torchvision's segmentation models), the same values."""
    if type(tree) in (dict, OrderedDict):  # not their subclasses (a ModelOutput stays one)
        return {key: _plain(value) for key, value in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(_plain(value) for value in tree)
    return tree


def _max_rel(comparison: Comparison) -> float:
    return comparison.max_rel if comparison.compared else math.nan


def measure(name: str, repeats: int = 3, budget_s: float = 60.0, side: int | None = None) -> ModelCost:
    """Measure every fuser on the whole model ``name`` of ``tests/whole_models.py``.

    Each round runs one eager forward and one call of every fuser, in balanced orders; rounds stop after
    ``repeats`` or, past the first, once the rounds so far took ``budget_s``. A fuser that raises is measured no
    further. The result of each fuser's last call is checked against the original model. ``side`` is the input's
    image side (``whole_models.build``; the builder's small default when ``None``).

    Raises:
        ValueError: if ``repeats`` is below 1 or ``name`` is not a whole model.
    """
    if repeats < 1:
        raise ValueError(f"measure({name!r}, repeats={repeats}): expected at least one round.")
    built = whole_models.build(name, side)
    model, inputs = built.model, built.example_inputs
    with torch.no_grad():
        reference = model(*inputs)
        reference_parts = built.parts(model)
    bn_before = count_batch_norms(lambda: model(*inputs), model)
    kernels_before = count_kernels(model, *inputs)

    def forward() -> None:
        with torch.no_grad():
            model(*inputs)

    forward()  # the first calls are slower (allocator, kernel selection); they are not what is compared
    fusers = _fusers(built)
    costs = {fuser: FuserCost() for fuser in fusers}
    results: dict[str, nn.Module] = {}
    forwards: list[float] = []
    names = [FORWARD, *fusers]
    orders = balanced_orders(len(names))
    ratios: dict[str, list[float]] = {fuser: [] for fuser in fusers}
    start = time.perf_counter()
    for r in range(repeats):
        if r and time.perf_counter() - start > budget_s:
            break
        round_s: dict[str, float] = {}
        for i in orders[r % len(orders)]:
            variant = names[i]
            gc.collect()
            if variant == FORWARD:
                round_s[FORWARD] = time_calls(forward, 1, torch.device("cpu"))
                continue
            if costs[variant].error:
                continue
            try:
                round_s[variant], results[variant] = _timed(fusers[variant])
            except Exception as err:  # a fuser that cannot take the model: reported, not measured further
                costs[variant].error = f"{type(err).__name__}: {first_line(err)}"
                results.pop(variant, None)
        forwards.append(round_s[FORWARD])
        for fuser in fusers:
            if fuser in round_s and not costs[fuser].error:
                costs[fuser].seconds.append(round_s[fuser])
                ratios[fuser].append(round_s[fuser] / round_s[FORWARD])
    for fuser, cost in costs.items():
        if cost.error or fuser not in results:
            cost.seconds = []
            continue
        cost.ratio = statistics.median(ratios[fuser])
        _check(cost, results[fuser], built, reference, reference_parts)
    return ModelCost(name, forwards, bn_before, kernels_before, costs)


def _check(
    cost: FuserCost, fused: nn.Module, built: whole_models.WholeModel, reference: Any, reference_parts: Any
) -> None:
    """Fill ``cost``'s counts and errors from ``fused`` against the original's output and parts."""
    inputs = built.example_inputs
    cost.reverted = len(getattr(getattr(fused, "fusion_report", None), "reverted", []))
    try:
        cost.bn_after = count_batch_norms(lambda: fused(*inputs), fused)
        cost.bn_kernels_after = count_kernels(fused, *inputs)
        with torch.no_grad():
            output = compare_trees(_plain(reference), _plain(fused(*inputs)))
    except Exception as err:
        cost.error = f"the fused model does not run: {type(err).__name__}: {first_line(err)}"
        return
    cost.max_rel_output = _max_rel(output)
    cost.output_varies = bool(output.varying)
    try:
        with torch.no_grad():
            parts = compare_trees(_plain(reference_parts), _plain(built.parts(fused)))
    except Exception:  # a GraphModule from torch.fx has no .backbone: only the whole output is compared
        cost.exact = output.compared_passed
        return
    cost.max_rel_parts = _max_rel(parts)
    # Post-processed detections may differ by rounding (a near-tied box or label flips): the parts decide.
    cost.exact = parts.compared_passed and (built.post_processed or output.compared_passed)


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _rel(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1e}"


def _output_rel(cost: FuserCost) -> str:
    return "varies" if cost.output_varies else _rel(cost.max_rel_output)


def _other(cost: FuserCost | None) -> str:
    """One cell for torch.fx's or ultralytics' fuse: time, ratio, BatchNorms left, exact or not."""
    if cost is None:
        return ""
    if cost.error:
        return f"fails ({cost.error[:60]})"
    verdict = "exact" if cost.exact else f"NOT exact ({_rel(max(cost.max_rel_output, cost.max_rel_parts))})"
    return f"{_seconds(cost.median_seconds)} s, {cost.ratio:.1f}x, BN {cost.bn_after}, {verdict}"


HEADER = (
    "model",
    "fuse (s)",
    "forward (s)",
    "fuse / forward",
    "BN before -> after",
    "reverted",
    "max rel err output",
    "max rel err parts",
    "torch.fx fuse",
    "ultralytics fuse()",
)


def table_rows(costs: Sequence[ModelCost]) -> list[list[str]]:
    """One row per model (the columns of :data:`HEADER`), then the row of medians and maxima of the ratios."""
    rows = []
    for cost in costs:
        ours = cost.fusers[FUSE]
        rows.append(
            [
                cost.model,
                "fails" if ours.error else _seconds(ours.median_seconds),
                _seconds(cost.forward_median),
                "-" if ours.error else f"{ours.ratio:.1f}",
                f"{cost.bn_before} -> {ours.bn_after}",
                str(ours.reverted),
                _output_rel(ours),
                _rel(ours.max_rel_parts),
                _other(cost.fusers.get(FX_FUSE)),
                _other(cost.fusers.get(ULTRALYTICS_FUSE)),
            ]
        )
    rows.append(summary_row(costs))
    return rows


def _ratios(costs: Sequence[ModelCost], fuser: str) -> list[float]:
    found = [c.fusers[fuser].ratio for c in costs if fuser in c.fusers and not c.fusers[fuser].error]
    return [r for r in found if not math.isnan(r)]


def summary_row(costs: Sequence[ModelCost]) -> list[str]:
    """The last row: median and maximum fuse/forward ratio of each fuser, over the models where it ran."""

    def spread(fuser: str) -> str:
        ratios = _ratios(costs, fuser)
        if not ratios:
            return ""
        return f"median {statistics.median(ratios):.1f}x, max {max(ratios):.1f}x ({len(ratios)} models)"

    ours = _ratios(costs, FUSE)
    median = f"{statistics.median(ours):.1f}" if ours else "-"
    top = f"max {max(ours):.1f}" if ours else ""
    return ["median", "", "", f"{median} ({top})", "", "", "", "", spread(FX_FUSE), spread(ULTRALYTICS_FUSE)]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated names from tests/whole_models.py, or 'all' (default: the README table's list)",
    )
    parser.add_argument(
        "--deploy-size",
        action="store_true",
        help="inputs at each model's deployed size (whole_models.DEPLOY_SIDES) instead of the tests' small ones",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per model (default 3)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds after which a model gets no new round")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (the README's)")
    args = parser.parse_args(argv)
    names = list(whole_models.BUILDERS) if args.models == "all" else [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in whole_models.BUILDERS]
    if unknown or not names:
        parser.error(f"--models {args.models}: unknown {unknown}; choose from {sorted(whole_models.BUILDERS)}")
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats {args.repeats} --threads {args.threads}: both must be at least 1")
    args.names = names
    return args


def main(argv: Sequence[str] | None = None) -> list[ModelCost]:
    """Run the benchmark from command-line arguments; returns what it measured."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    # Imports and first-call caches of the fusers are not what a user pays per model: warm them up once.
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fuse(tiny, example_inputs=(torch.randn(1, 3, 8, 8),))
    _fx_fuse(tiny)
    costs = []
    sizes = "deployed sizes (whole_models.DEPLOY_SIDES)" if args.deploy_size else "the builders' small sizes"
    print(f"inputs at {sizes}; load average before: {load_average()}", file=sys.stderr, flush=True)
    for name in args.names:
        side = whole_models.DEPLOY_SIDES[name] if args.deploy_size else None
        cost = measure(name, args.repeats, args.budget, side)
        costs.append(cost)
        row = table_rows([cost])[0]
        print("  ".join(f"{h}={v}" for h, v in zip(HEADER, row) if v), file=sys.stderr, flush=True)
    print(f"load average after: {load_average()}", file=sys.stderr, flush=True)
    rows = table_rows(costs)
    if args.markdown:
        print(markdown_table(HEADER, rows))
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
        for line in [list(HEADER), *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    if args.json:
        args.json.write_text(json.dumps([c.to_dict() for c in costs], indent=2, default=str))
    return costs


if __name__ == "__main__":
    main()

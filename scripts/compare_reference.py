"""Compare ``fx_lightning.fuse`` with ``torch.fx.experimental.optimization.fuse`` on the torchvision zoo.

For each model: the BatchNorm kernels one forward pass runs, how many each tool leaves, and each tool's
maximum relative error against the unfused eval model. Then the small cases where the reference is wrong
or gives up. Prints a Markdown table; ``--json`` also writes the rows.

    python scripts/compare_reference.py --models resnet18 densenet121 --json /tmp/compare.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as reference_fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fx_lightning import count_kernels, fuse
from fx_lightning.errors import first_line
from fx_lightning.verify.compare import relative_error

# The zoo builders live with the tests, so that the test suite and this comparison build identical models.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import build, example_input, reference_pitfalls, zoo_names  # noqa: E402


@dataclass
class ToolResult:
    """What one fusing tool did to one model."""

    left: int | None = None
    error: float | None = None
    seconds: float | None = None
    failure: str = ""


@dataclass
class Row:
    """One model or case: kernels run before fusing, and each tool's result."""

    name: str
    kernels: int
    reference: ToolResult
    ours: ToolResult
    notes: list[str] = field(default_factory=list)


def _run_tool(tool: Any, model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> ToolResult:
    start = time.perf_counter()
    try:
        fused = tool(model)
    except Exception as err:  # noqa: BLE001 - a tool failing is a result to report, not a crash
        return ToolResult(failure=f"{type(err).__name__}: {first_line(str(err), limit=160)}")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = fused(x)
    result = ToolResult(count_kernels(fused, x), relative_error(ref, out), seconds)
    del fused
    return result


def compare(name: str, model: nn.Module, x: torch.Tensor) -> Row:
    """Fuse ``model`` with both tools and measure kernels left and relative error against ``model.eval()``."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
    kernels = count_kernels(model, x)
    # The reference deep-copies by default, and asserts eval mode on every layer it folds.
    reference = _run_tool(reference_fuse, model, x, ref)
    ours = _run_tool(fuse, model, x, ref)
    return Row(name, kernels, reference, ours)


def _conv_transpose_helper_note(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> str:
    """What torch's own ConvTranspose + BN helper (used by ``torch.ao.quantization.fuse_modules``) does here."""
    try:
        fused = fuse_conv_bn_eval(model.conv, model.bn, transpose=True)
        with torch.no_grad():
            err = relative_error(ref, fused(x))
    except Exception as err:  # noqa: BLE001 - reported as the helper's outcome
        reason = f"{type(err).__name__}: {first_line(str(err), limit=160)}"
        return f"torch.nn.utils.fusion.fuse_conv_bn_eval(transpose=True): {reason}"
    return f"torch.nn.utils.fusion.fuse_conv_bn_eval(transpose=True): relative error {err:.2e}"


def _fmt_left(result: ToolResult) -> str:
    return "failed" if result.failure else str(result.left)


def _fmt_error(result: ToolResult) -> str:
    return "-" if result.error is None else f"{result.error:.1e}"


def markdown(rows: list[Row], title: str) -> str:
    """A Markdown table of ``rows`` under a ``title`` heading."""
    lines = [
        f"### {title}",
        "",
        "| model | BN kernels run | left by reference | left by fx_lightning | max rel. error reference "
        "| max rel. error fx_lightning | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        notes = list(row.notes)
        if row.reference.failure:
            notes.insert(0, f"reference: {row.reference.failure}")
        if row.ours.failure:
            notes.insert(0, f"fx_lightning: {row.ours.failure}")
        note = "; ".join(notes).replace("|", "\\|")
        lines.append(
            f"| {row.name} | {row.kernels} | {_fmt_left(row.reference)} | {_fmt_left(row.ours)} "
            f"| {_fmt_error(row.reference)} | {_fmt_error(row.ours)} | {note} |"
        )
    return "\n".join(lines)


def totals(rows: list[Row]) -> dict[str, Any]:
    """Kernel and model counts over ``rows``; a failed tool counts as folding nothing."""

    def left(r: ToolResult, kernels: int) -> int:
        return kernels if r.failure or r.left is None else r.left

    def max_error(results: list[ToolResult]) -> float | None:
        errors = [r.error for r in results if r.error is not None]
        return max(errors) if errors else None

    kernels = sum(r.kernels for r in rows)
    with_bn = [r for r in rows if r.kernels]
    return {
        "models": len(rows),
        "models_with_batch_norm": len(with_bn),
        "kernels": kernels,
        "folded_by_reference": kernels - sum(left(r.reference, r.kernels) for r in rows),
        "folded_by_fx_lightning": kernels - sum(left(r.ours, r.kernels) for r in rows),
        "fully_folded_by_reference": sum(left(r.reference, r.kernels) == 0 for r in with_bn),
        "fully_folded_by_fx_lightning": sum(left(r.ours, r.kernels) == 0 for r in with_bn),
        "reference_failures": [r.name for r in rows if r.reference.failure],
        "fx_lightning_failures": [r.name for r in rows if r.ours.failure],
        "fx_lightning_leaves_more": [r.name for r in rows if left(r.ours, r.kernels) > left(r.reference, r.kernels)],
        "max_error_reference": max_error([r.reference for r in rows]),
        "max_error_fx_lightning": max_error([r.ours for r in rows]),
        "reference_seconds": sum(r.reference.seconds or 0.0 for r in rows),
        "fx_lightning_seconds": sum(r.ours.seconds or 0.0 for r in rows),
    }


def _totals_markdown(summary: dict[str, Any]) -> str:
    def err(value: float | None) -> str:
        return "-" if value is None else f"{value:.1e}"

    return "\n".join(
        [
            f"- models: {summary['models']} ({summary['models_with_batch_norm']} with BatchNorm)",
            f"- BatchNorm kernels run: {summary['kernels']}; folded by the reference: "
            f"{summary['folded_by_reference']}; folded by fx_lightning: {summary['folded_by_fx_lightning']}",
            f"- models with BatchNorm fully folded: reference {summary['fully_folded_by_reference']}, "
            f"fx_lightning {summary['fully_folded_by_fx_lightning']}",
            f"- max relative error: reference {err(summary['max_error_reference'])}, "
            f"fx_lightning {err(summary['max_error_fx_lightning'])}",
            f"- failures: reference {summary['reference_failures'] or 'none'}, "
            f"fx_lightning {summary['fx_lightning_failures'] or 'none'}",
            f"- models where fx_lightning leaves more kernels than the reference: "
            f"{summary['fx_lightning_leaves_more'] or 'none'}",
            f"- time spent fusing: reference {summary['reference_seconds']:.1f} s, "
            f"fx_lightning {summary['fx_lightning_seconds']:.1f} s",
        ]
    )


def run_zoo(names: list[str], json_path: Path | None = None) -> list[Row]:
    """Compare both tools on each named torchvision model, printing progress to stderr.

    With ``json_path``, the rows so far are written there after every model, so an interrupted run keeps them.
    """
    rows: list[Row] = []
    for name in names:
        start = time.perf_counter()
        model = build(name)
        rows.append(compare(name, model, example_input(name)))
        del model
        gc.collect()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if json_path is not None:
            _write_json(json_path, rows, [])
    return rows


def _write_json(path: Path, zoo_rows: list[Row], pitfall_rows: list[Row]) -> None:
    payload = {
        "zoo": [asdict(r) for r in zoo_rows],
        "totals": totals(zoo_rows),
        "pitfalls": [asdict(r) for r in pitfall_rows],
        "torch": torch.__version__,
    }
    path.write_text(json.dumps(payload, indent=2))


def run_pitfalls() -> list[Row]:
    """Compare both tools on the small cases where the reference is wrong or gives up."""
    rows = []
    for name, model, x in reference_pitfalls():
        row = compare(name, model, x)
        if "ConvTranspose" in name:
            with torch.no_grad():
                row.notes.append(_conv_transpose_helper_note(model, x, model(x)))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="torchvision model names; default: the whole zoo")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and totals to this JSON file")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the small inputs make many tiny ops, which extra threads "
        "slow down on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: expected a positive number of threads, e.g. --threads 1")
    torch.set_num_threads(args.threads)

    known = zoo_names()
    names = known if not args.models else args.models
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"--models {' '.join(unknown)}: not torchvision classification models. Choose from: {known}")

    zoo_rows = run_zoo(names, args.json)
    pitfall_rows = run_pitfalls()
    print(markdown(zoo_rows, "torchvision classification zoo"))
    print()
    print("Totals over the zoo:")
    print(_totals_markdown(totals(zoo_rows)))
    print()
    print(markdown(pitfall_rows, "Cases where the reference is wrong or gives up"))
    if args.json is not None:
        _write_json(args.json, zoo_rows, pitfall_rows)


if __name__ == "__main__":
    main()

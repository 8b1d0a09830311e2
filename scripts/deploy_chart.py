"""Render the deploy part of a report to a PNG: latency ratio per artifact, the task metric beside it.

    python scripts/deploy_chart.py fuse_report.json deploy.png

Reads any JSON file with an ``"artifacts"`` entry in the schema of :meth:`fx_lightning.deploy.flow.DeployReport.to_dict`
(``fuse_report.json``, or ``json.dump(report.to_dict(), ...)``). One bar per artifact (and per eager network when
the report has them) shows its latency relative to the unfused eager network; the label at the bar's end gives
the milliseconds and the artifact's metric, and failed artifacts are drawn hatched and marked FAILED.
Needs matplotlib: ``pip install "fx-lightning[plot]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def chart_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per bar: label, latency ratio and ms, the metric text, and whether it passed.

    Raises:
        ValueError: if the report has no ``"artifacts"``.
    """
    artifacts = report.get("artifacts") if isinstance(report, Mapping) else None
    if not isinstance(artifacts, Mapping):
        got = f"keys {list(report)}" if isinstance(report, Mapping) else type(report).__name__
        raise ValueError(
            f"deploy_chart: the report has no 'artifacts' entry (got {got}). Pass fuse_report.json written with "
            "artifacts verified, or json.dump(DeployReport.to_dict(), ...)."
        )
    rows = []
    for key in ("unfused", "fused"):
        eager = (report.get("eager") or {}).get(key) or {}
        if _real(eager.get("latency_ratio")):
            rows.append(
                {
                    "label": f"{key} (eager)",
                    "ratio": eager["latency_ratio"],
                    "ms": eager.get("latency_ms"),
                    "metric": "",
                    "passed": True,
                }
            )
    for fmt, entry in artifacts.items():
        verification = entry.get("verification") or {}
        metric = verification.get("metric_artifact") or {}
        rows.append(
            {
                "label": fmt,
                "ratio": entry.get("latency_ratio"),
                "ms": entry.get("latency_ms"),
                "metric": ", ".join(f"{k} {v:.4f}" for k, v in metric.items() if _real(v)),
                "passed": bool(verification.get("passed")),
            }
        )
    return rows


def render(report: Mapping[str, Any], out: str | Path) -> Path:
    """Draw the chart of ``report`` to ``out`` (PNG) and return the path.

    Raises:
        ValueError: if the report has no ``"artifacts"`` or no artifact has a latency.
        ModuleNotFoundError: without matplotlib (the message names the extra).
    """
    rows = [r for r in chart_rows(report) if _real(r["ratio"])]
    if not rows:
        raise ValueError(
            "deploy_chart: no artifact in the report has a latency_ratio; verify the artifacts with a latency "
            "budget (verify_artifacts(latency_budget_s=1.0)) to chart them."
        )
    plt = _pyplot()
    height = 0.6 + 0.45 * len(rows)
    fig, ax = plt.subplots(figsize=(8.0, height))
    labels = [r["label"] for r in rows][::-1]
    ratios = [r["ratio"] for r in rows][::-1]
    bars = ax.barh(labels, ratios, color=["#4c72b0" if r["passed"] else "#c44e52" for r in rows][::-1])
    for bar, row in zip(bars, rows[::-1]):
        if not row["passed"]:
            bar.set_hatch("//")
        ms = f"{row['ms']:.3g} ms" if _real(row["ms"]) else ""
        text = "  ".join(t for t in (ms, row["metric"], "" if row["passed"] else "FAILED") if t)
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {text}", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("latency relative to the unfused eager network (lower is faster)")
    ax.set_xlim(0, max(ratios) * 1.9)
    latency = report.get("latency") or {}
    if latency:
        ax.set_title(
            f"deploy artifacts: batch {latency.get('batch_size')}, {latency.get('threads')} thread(s)", fontsize=10
        )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _pyplot() -> Any:
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            'deploy_chart needs matplotlib. Install the plot extra: pip install "fx-lightning[plot]"'
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a JSON report with an 'artifacts' entry (fuse_report.json)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"cannot read {args.report}: {err}")
    print(render(report, args.out))


if __name__ == "__main__":
    main()

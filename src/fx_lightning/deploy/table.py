"""The deploy table: one row per artifact (its runtime, metric, agreement, latency), printed in the summary."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def deploy_table(report: Mapping[str, Any]) -> str:
    """The deploy table of a report dict (:meth:`DeployReport.to_dict`, or ``fuse_report.json`` loaded).

    Columns: format, runtime, metric (the artifact's, with the original's in the title), max abs diff, passed,
    latency (ms), ratio (to the unfused eager network). The eager networks come first when the report has them.

    Raises:
        ValueError: if ``report`` has no ``"artifacts"``.

    Example:
        >>> row = {"path": "m.pt2", "runtime": "torch.export.load", "latency_ms": 1.0, "latency_ratio": 0.5,
        ...        "verification": {"metric_original": {"acc": 0.9}, "metric_artifact": {"acc": 0.9},
        ...                         "max_abs_diff": 1e-6, "num_samples": 8, "passed": True}}
        >>> print(deploy_table({"artifacts": {"pt2": row}}))  # doctest: +NORMALIZE_WHITESPACE
        deploy artifacts, verified on 8 samples against the original (acc 0.9000)
        format  runtime            acc     max abs diff  passed  latency ms  ratio
        pt2     torch.export.load  0.9000  1.00e-06      yes     1.000       0.500
    """
    artifacts = report.get("artifacts") if isinstance(report, Mapping) else None
    if not isinstance(artifacts, Mapping):
        got = f"keys {list(report)}" if isinstance(report, Mapping) else type(report).__name__
        raise ValueError(
            "deploy_table(report) expects a dict with an 'artifacts' entry (DeployReport.to_dict() or a "
            f"fuse_report.json loaded with json.load), got {got}."
        )
    names: list[str] = []
    original: dict[str, float] = {}
    samples = set()
    for entry in artifacts.values():
        verification = entry.get("verification") or {}
        for key, value in (verification.get("metric_original") or {}).items():
            original.setdefault(key, value)
            if key not in names:
                names.append(key)
        samples.add(verification.get("num_samples"))
    derived = any("base" in entry for entry in artifacts.values())
    header = ["format", "runtime", *names, "max abs diff", "passed", "latency ms", "ratio"]
    if derived:  # int8 rows: latency against the float artifact of the same runtime, layers kept in float
        header += ["vs float", "float layers", "calib s"]
    rows = []
    for key, label in (("unfused", "unfused"), ("fused", "fused")):
        eager = (report.get("eager") or {}).get(key)
        if eager and eager.get("latency_ms") is not None:
            rows.append(
                [
                    label,
                    "torch eager",
                    *["" for _ in names],
                    "",
                    "",
                    _num(eager["latency_ms"]),
                    _num(eager["latency_ratio"]),
                    *(["", "", ""] if derived else []),
                ]
            )
    for fmt, entry in artifacts.items():
        verification = entry.get("verification") or {}
        metric = verification.get("metric_artifact") or {}
        diff = verification.get("max_abs_diff")
        rows.append(
            [
                fmt,
                str(entry.get("runtime", "")),
                *[_num(metric.get(name), 4) for name in names],
                f"{diff:.2e}" if isinstance(diff, (int, float)) else "-",
                "yes" if verification.get("passed") else "NO",
                _num(entry.get("latency_ms")),
                _num(entry.get("latency_ratio")),
                *(_derived_cells(entry) if derived else []),
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    counts = sorted(s for s in samples if s)
    reference = ", ".join(f"{k} {v:.4f}" for k, v in original.items())
    if not counts:  # no artifact could be loaded and run: nothing was compared
        return "\n".join(["deploy artifacts, none verified (none could be loaded and run)", *lines])
    on = f"verified on {counts[0]} samples" if len(counts) == 1 else f"verified on {counts} samples"
    title = f"deploy artifacts, {on} against the original" + (f" ({reference})" if reference else "")
    return "\n".join([title, *lines])


def _derived_cells(entry: Mapping[str, Any]) -> list[str]:
    """The int8 columns of a row: latency ratio to its float artifact, layers kept in float, calibration time."""
    if "base" not in entry:
        return ["", "", ""]
    int8 = entry.get("int8") or {}
    layers = int8.get("float_layers")
    return [
        _num(entry.get("latency_ratio_base")),
        str(len(layers)) if isinstance(layers, list) else "-",
        _num(int8.get("calibration_s"), 1),
    ]


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"

"""How artifacts fared where they run: one :class:`ArtifactReport` per artifact, gathered in a :class:`DeployReport`.

:func:`fx_lightning.deploy.check.verify_artifacts` fills them in; :meth:`DeployReport.to_dict` is what
``fuse_report.json`` holds under ``"artifacts"``, and :meth:`DeployReport.table` prints it
(:func:`fx_lightning.deploy.table.deploy_table`). Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fx_lightning.deploy.table import deploy_table
from fx_lightning.verify.verifier import VerificationResult

__all__ = ["ArtifactReport", "DeployReport"]


@dataclass
class ArtifactReport:
    """How one artifact fared in its runtime.

    Attributes:
        format: the format name.
        path: where the artifact is now (renamed to ``<stem>.FAILED<suffix>`` when it failed).
        runtime: what ran it.
        verification: the comparison with the original network over the verification data (``metric_fused``
            holds the artifact's metric), or ``None`` when the artifact could not be loaded or run.
        latency_ms: median latency on the example batch, or ``None`` when not measured.
        latency_ratio: latency relative to the unfused eager network (median of per-round ratios).
        seconds: time to write it, load it back and verify it.
        error: why it could not be loaded or run, or ``""``.
        notes: what the user should know (a fixed batch size verified in chunks, ...).
        base: the artifact of the same runtime this one derives from (``"onnx"`` for ``"onnx-int8"``), or ``None``.
        latency_ratio_base: latency relative to ``base``'s (median of per-round ratios), or ``None``.
        details: facts about how it was made (``{"int8": {...}}``), reported with it.
    """

    format: str
    path: Path
    runtime: str
    verification: VerificationResult | None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    seconds: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)
    base: str | None = None
    latency_ratio_base: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether it loaded, ran and passed verification."""
        return not self.error and self.verification is not None and self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        """The artifact's entry of the report's ``"artifacts"`` (plain JSON data)."""
        v = self.verification
        verification: dict[str, Any] = {
            "metric_original": dict(v.metric_original) if v else {},
            "metric_artifact": dict(v.metric_fused) if v else {},
            "max_abs_diff": _finite(v.max_abs_diff) if v else None,
            "max_rel_diff": _finite(v.max_rel_diff) if v else None,
            "compared": v.compared if v else None,
            "num_samples": v.num_samples if v else 0,
            "passed": self.passed,
            "tolerance": v.tolerance if v else None,
            "output_tolerance": v.output_tolerance if v else None,
            "top1_agreement": v.top1_agreement if v else None,
            "metric_drop": {k: value - v.metric_fused.get(k, math.nan) for k, value in v.metric_original.items()}
            if v
            else {},
        }
        entry = {
            "path": str(self.path),
            "runtime": self.runtime,
            "verification": verification,
            "latency_ms": self.latency_ms,
            "latency_ratio": self.latency_ratio,
            "seconds": self.seconds,
            "error": self.error or None,
            "notes": [*self.notes, *(v.notes if v else [])],
        }
        if self.base is not None:
            entry["base"] = self.base
            entry["latency_ratio_base"] = self.latency_ratio_base
        return entry | self.details

    def failure(self) -> str:
        """One sentence naming the artifact and the figures that failed it ("" when it passed)."""
        if self.passed:
            return ""
        where = f"the '{self.format}' artifact {self.path} (run by {self.runtime})"
        if self.error or self.verification is None:
            return f"{where} could not be checked: {self.error}"
        v = self.verification
        figures = []
        for name, value in v.metric_original.items():
            diff = abs(v.metric_fused.get(name, math.nan) - value)
            missed = f", missed by {diff - v.tolerance:.3g}" if diff > v.tolerance else ""
            figures.append(
                f"{name} original {value:.6g}, artifact {v.metric_fused.get(name, math.nan):.6g} "
                f"(|diff| {diff:.3g}, tolerance {v.tolerance:g}{missed})"
            )
        figures.append(
            f"max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g}"
            + (f" (tolerance {v.output_tolerance:g}, relative)" if v.output_tolerance is not None else "")
        )
        if v.varying and not v.metric_original:
            figures.append(f"compared: {v.compared}")
        if v.ties:  # detections that part at an untied score, or at a tie with nothing agreed above it
            figures.append(v.ties)
        summary = (self.details.get("int8") or {}).get("summary")
        if summary:
            figures.append(f"int8: {summary}")
        return f"{where} failed verification over {v.num_samples} samples: {'; '.join(figures)}"


@dataclass
class DeployReport:
    """Every artifact's check, the eager networks' latency, and how latency was measured.

    Attributes:
        artifacts: format -> :class:`ArtifactReport`, in the order written.
        eager: ``{"unfused": {"latency_ms", "latency_ratio"}, "fused": {...}}`` (values ``None`` when not timed).
        threads: ``torch.get_num_threads()`` during timing.
        batch_size: the example batch's size (``None`` when the inputs have no batch dimension).
        budget_s: the timing budget.
        rounds: timed rounds.
    """

    artifacts: dict[str, ArtifactReport]
    eager: dict[str, dict[str, float | None]]
    threads: int
    batch_size: int | None
    budget_s: float
    rounds: int = 0

    @property
    def passed(self) -> bool:
        """Whether every artifact passed."""
        return all(a.passed for a in self.artifacts.values())

    def announced(self) -> dict[str, Path]:
        """The paths of the artifacts that passed: the ones to hand to users."""
        return {fmt: a.path for fmt, a in self.artifacts.items() if a.passed}

    def failures(self) -> list[str]:
        """One sentence per artifact that failed, naming it and its figures."""
        return [a.failure() for a in self.artifacts.values() if not a.passed]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data: ``{"artifacts": {...}, "eager": {...}, "latency": {...}}``."""
        return {
            "artifacts": {fmt: a.to_dict() for fmt, a in self.artifacts.items()},
            "eager": {k: dict(v) for k, v in self.eager.items()},
            "latency": {
                "threads": self.threads,
                "batch_size": self.batch_size,
                "budget_s": self.budget_s,
                "rounds": self.rounds,
            },
        }

    def table(self) -> str:
        """The deploy table (format, runtime, metric, max abs diff, passed, latency, ratio) as plain text."""
        return deploy_table(self.to_dict())

    def __str__(self) -> str:
        return self.table()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

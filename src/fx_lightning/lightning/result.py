"""What one fusion by :class:`~fx_lightning.FuseOnExport` did: its :class:`Outcome` and the :class:`FuseResult`
behind the summary, the JSON report and the logged figures. Plain data; nothing here imports Lightning."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fx_lightning.fusion.report import FusionReport
from fx_lightning.verify.verifier import VerificationResult


class Outcome(str, Enum):
    """What became of one fusion (a ``str``, so reports and logs stay plain text)."""

    #: the fused networks passed verification (or were not verified); they run in the loop, and are exported
    FUSED = "fused"
    #: verification failed and ``on_mismatch="warn"``: the fused networks are used anyway
    KEPT_DESPITE_MISMATCH = "kept despite mismatch"
    #: verification failed: the user's networks are used
    REVERTED = "reverted"
    #: BatchNorms were found, none could be folded exactly (the report says why): nothing is used or exported
    NOTHING_FOLDED = "nothing folded"
    #: no network with a BatchNorm was found
    NO_BATCH_NORM = "no BatchNorm"
    #: something raised (the engine, the verification, the data); the user's networks are used
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def in_place(self) -> bool:
        """Whether the fused networks are used (in the loop) and exported."""
        return self in (Outcome.FUSED, Outcome.KEPT_DESPITE_MISMATCH)


@dataclass
class FuseResult:
    """What one fusion by :class:`FuseOnExport` did: the facts behind the summary, the JSON report and the logs.

    Attributes:
        stage: the Trainer call it ran for: ``"fit"`` (at the end of training), ``"test"``, ``"predict"``
            or ``"validate"``.
        attributes: the networks fused (attribute paths, or ``"self"`` for the LightningModule's own layers).
        reports: the :class:`~fx_lightning.FusionReport` of each network.
        outcome: an :class:`Outcome`.
        kernels_before: BatchNorms one forward of the fused networks ran before fusion (ATen kernels, plus
            frozen BatchNorm modules, which compute without one).
        kernels_after: the same count after fusion.
        verification: the comparison of original and fused outputs, ``None`` when not verified.
        verify_source: where the verification data came from (``"val"``, ``"test"``, ``"given"``, ...).
        artifacts: format name -> path of each artifact that passed its check in its runtime (the announced ones).
        deploy: :meth:`fx_lightning.deploy.flow.DeployReport.to_dict` of the artifacts' checks: every artifact
            written (failed ones too), with its runtime, verification and latency, and the eager networks' latency.
        deploy_table: the deploy table (:meth:`fx_lightning.deploy.flow.DeployReport.table`) for the summary.
        report_path: the JSON report, written on global rank zero for every outcome.
        seconds: time spent fusing, verifying and exporting.
        validation_epoch_seconds: after ``fit``, how long its last validation epoch took (the yardstick the
            summary puts ``seconds`` beside), ``None`` when ``fit`` ran no validation epoch.
        ckpt_path: the checkpoint the weights came from, when Lightning restored one.
        error: the error turned into a warning (``strict=False``), or that was raised.
        notes: what else the user should know: networks skipped and why, why nothing folded.
    """

    stage: str
    attributes: list[str] = field(default_factory=list)
    reports: dict[str, FusionReport] = field(default_factory=dict)
    outcome: Outcome = Outcome.FUSED
    kernels_before: int | None = None
    kernels_after: int | None = None
    verification: VerificationResult | None = None
    verify_source: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=dict)
    deploy_table: str = ""
    report_path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    validation_epoch_seconds: float | None = None
    ckpt_path: str | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_folded(self) -> int:
        return sum(r.num_folded for r in self.reports.values())

    def to_dict(self) -> dict[str, Any]:
        """Return plain JSON-serialisable data (also what the callback keeps in checkpoints)."""
        return {
            "stage": self.stage,
            "attributes": list(self.attributes),
            "outcome": self.outcome.value,
            "num_folded": self.num_folded,
            "kernels_before": self.kernels_before,
            "kernels_after": self.kernels_after,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "verify_source": self.verify_source,
            "artifacts": self._artifact_entries(),
            "eager": self.deploy.get("eager", {}),
            "latency": self.deploy.get("latency", {}),
            "report_path": self.report_path,
            "seconds": dict(self.seconds),
            "validation_epoch_seconds": self.validation_epoch_seconds,
            "ckpt_path": self.ckpt_path,
            "error": self.error,
            "notes": list(self.notes),
            "reports": {name: report.to_dict() for name, report in self.reports.items()},
        }

    def _artifact_entries(self) -> dict[str, Any]:
        """Each artifact's check as ``fuse_report.json`` holds it; an artifact written but not checked in a runtime
        (the deploy checkpoint of a network called with keywords) gets its path and runtime only."""
        entries = dict(self.deploy.get("artifacts", {}))
        paths = {entry.get("path") for entry in entries.values()}
        for fmt, path in self.artifacts.items():
            if path not in paths:
                entries[fmt] = {"path": path, "runtime": "", "verification": None, "latency_ms": None}
        return entries

    def log_metrics(self, prefix: str = "fuse/") -> dict[str, float]:
        """The figures sent to the Trainer's loggers, as ``{prefix + name: value}``."""
        metrics: dict[str, float] = {
            "folded": float(self.num_folded),
            "skipped": float(sum(r.num_skipped for r in self.reports.values())),
            "untraced": float(sum(len(r.untraced) for r in self.reports.values())),
            "in_place": float(self.outcome.in_place),
        }
        if self.kernels_before is not None and self.kernels_after is not None:
            metrics["kernels_removed"] = float(self.kernels_before - self.kernels_after)
        if self.verification is not None:
            v = self.verification
            metrics |= {
                "passed": float(v.passed),
                "max_abs_diff": float(v.max_abs_diff),
                "max_rel_diff": float(v.max_rel_diff),
            }
            if v.top1_agreement is not None:
                metrics["top1_agreement"] = float(v.top1_agreement)
            metrics |= {f"{k}_original": float(val) for k, val in v.metric_original.items()}
            metrics |= {f"{k}_fused": float(val) for k, val in v.metric_fused.items()}
        metrics |= {f"seconds_{k}": float(val) for k, val in self.seconds.items()}
        return {prefix + k: val for k, val in metrics.items() if math.isfinite(val)}

    def __str__(self) -> str:
        where = "end of fit" if self.stage == "fit" else f"before {self.stage}"
        names = ", ".join(self.attributes) or "nothing"
        lines = [f"FuseOnExport ({where}): {names} -> {self.outcome.value}"]
        if self.ckpt_path:
            lines.append(f"  weights from checkpoint: {self.ckpt_path}")
        for report in self.reports.values():
            lines += ["  " + line for line in str(report).splitlines()]
        if self.kernels_before is not None and self.kernels_after is not None:
            lines.append(
                f"  BatchNorm kernels per forward: {self.kernels_before} -> {self.kernels_after} "
                f"({self.kernels_before - self.kernels_after} removed)"
            )
        if self.verification is not None:
            v = self.verification
            after = v.metric_fused
            figures = ", ".join(f"{k} {x:.4f} -> {after.get(k, math.nan):.4f}" for k, x in v.metric_original.items())
            lines.append(
                f"  verification on {v.num_samples} samples ({self.verify_source}): {figures or 'outputs only'}; "
                f"max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g}{agreement_text(v)}, "
                f"tolerance {v.tolerance:g} -> "
                f"{'passed' if v.passed else 'FAILED'}"
            )
            lines += [f"  note: {note}" for note in v.notes]
        elif self.verify_source:
            lines.append(f"  verification: {self.verify_source}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.seconds:
            line = "  time: " + ", ".join(f"{k} {s:.2f}s" for k, s in self.seconds.items())
            epoch = self.validation_epoch_seconds
            if epoch:
                total = sum(self.seconds.values())
                line += f" ({total:.2f}s in all, {total / epoch:.1f}x the last validation epoch of {epoch:.2f}s)"
            lines.append(line)
        lines += ["  " + line for line in self.deploy_table.splitlines()]
        for fmt, path in self.artifacts.items():
            lines.append(f"  artifact ({fmt}): {path}")
        if self.report_path:
            lines.append(f"  report: {self.report_path}")
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


def agreement_text(v: VerificationResult) -> str:
    """``", top-1 agreement 99.63%"``, or ``""`` when not computed."""
    return "" if v.top1_agreement is None else f", top-1 agreement {100 * v.top1_agreement:.2f}%"


@dataclass
class FuseState:
    """What FuseOnExport keeps in a checkpoint (under its ``state_key``): plain data only, so that the checkpoint
    loads with ``torch.load(weights_only=True)``.

    Attributes:
        history: every fusion's report (:meth:`FuseResult.to_dict` as JSON data), oldest first.

    Example:
        >>> state = FuseState.from_dict({"history": [{"stage": "fit"}]})
        >>> state.history, state.to_dict() == {"history": [{"stage": "fit"}]}
        ([{'stage': 'fit'}], True)
    """

    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The state as the checkpoint holds it (a deep copy: later fusions do not change a saved state)."""
        return {"history": copy.deepcopy(self.history)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FuseState:
        """The state a checkpoint holds; keys it does not know are ignored, missing ones take their defaults.

        Raises:
            TypeError: if ``data`` is not a dict, or its ``"history"`` not a list.
        """
        if not isinstance(data, dict):
            raise TypeError(f"FuseOnExport.load_state_dict expects a dict, got {type(data).__name__}.")
        history = data.get("history", [])
        if not isinstance(history, list):
            raise TypeError(
                f"FuseOnExport.load_state_dict expects 'history' to be a list of reports, got {type(history).__name__}."
            )
        return cls(history=copy.deepcopy(history))

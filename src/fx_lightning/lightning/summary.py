"""What FuseOnExport tells the user after a fusion: the JSON report, the loggers, the summary, and the warning or
error its outcome calls for.

Messages go through Lightning's ``rank_zero_info``/``rank_zero_warn`` from global rank zero only, and every error
names ``FuseOnExport(...)`` with the option that decides it (``strict=True``, ``on_mismatch='raise'``).
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from fx_lightning.lightning.options import FuseOptions
from fx_lightning.lightning.result import FuseResult, Outcome, agreement_text

REPORT_FILE = "fuse_report.json"


def report_file(stage: str, export_stages: list[str]) -> str:
    """The JSON report's file name for a fusion before ``stage``: ``fuse_report.json`` when that fusion exports
    (the deploy report), ``fuse_report.<stage>.json`` otherwise.

    Example:
        >>> report_file("fit", ["fit"]), report_file("test", ["fit"])
        ('fuse_report.json', 'fuse_report.test.json')
    """
    if stage in export_stages:
        return REPORT_FILE
    return REPORT_FILE.replace(".json", f".{stage}.json")


def write_report(trainer: Any, result: FuseResult, strict: bool) -> dict[str, Any]:
    """Log the result's figures, write its JSON report (global rank zero) and print its summary; returns the
    report as plain data. A logger or a full disk warns (raises with ``strict``): the finished run is never lost."""
    data = jsonable(result.to_dict())
    metrics = result.log_metrics()
    try:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        if trainer.is_global_zero and result.report_path:
            path = Path(result.report_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2) + "\n")
    except Exception as err:
        if strict:
            raise RuntimeError(
                f"FuseOnExport(strict=True) could not write its report to {result.report_path}: {err}"
            ) from err
        warn(trainer, f"FuseOnExport could not write its report to {result.report_path}: {err}")
    info(trainer, str(result))
    return data


def raise_or_warn(trainer: Any, result: FuseResult, failure: Exception | None, options: FuseOptions) -> None:
    """After the report is written: raise (``strict=True``, ``on_mismatch="raise"``) or warn, as the outcome says."""
    where = "at the end of fit" if result.stage == "fit" else f"before {result.stage}"
    if result.outcome is Outcome.FAILED:
        if options.strict:
            raise RuntimeError(
                f"FuseOnExport(strict=True) failed {where} on {result.attributes or 'the networks'}, in "
                f"{result.error}. The original network is in place; the report is at {result.report_path}. "
                "Set strict=False to continue with a warning."
            ) from failure
        warn(
            trainer,
            f"FuseOnExport failed {where} on {result.attributes or 'the networks'}, in {result.error}; "
            "continuing with the original network. Set strict=True to raise instead.",
        )
        return
    if result.error:  # the export failed; the fusion itself is fine
        if options.strict:
            raise RuntimeError(
                f"FuseOnExport(strict=True) could not export the fused network {where}: {result.error}. "
                "Fix the cause, choose other export_formats, or set strict=False to continue with a warning."
            )
        warn(trainer, f"FuseOnExport: {result.error}; artifacts are missing.")
    if result.outcome is Outcome.NO_BATCH_NORM:
        warn(trainer, f"FuseOnExport found nothing to fuse {where}: {'; '.join(result.notes)}")
    elif result.outcome is Outcome.NOTHING_FOLDED:
        warn(trainer, f"FuseOnExport folded nothing {where}: {'; '.join(result.notes)}")
    elif result.outcome in (Outcome.REVERTED, Outcome.KEPT_DESPITE_MISMATCH):
        _mismatch(trainer, result, options)


def _mismatch(trainer: Any, result: FuseResult, options: FuseOptions) -> None:
    v = result.verification
    if v is None:  # a mismatch outcome always comes from a verification
        raise RuntimeError(f"FuseOnExport: outcome {result.outcome.value!r} without a verification result")
    diffs = ", ".join(
        f"{k} {v.metric_original[k]:.6g} (original) vs {v.metric_fused.get(k, float('nan')):.6g} (fused)"
        for k in v.metric_original
    )
    detail = (
        f"the fused network failed verification before {result.stage}: {diffs or 'outputs'}, tolerance "
        f"{v.tolerance:g}, max abs diff {v.max_abs_diff:.3g}{agreement_text(v)}"
    )
    if options.strict or options.on_mismatch == "raise":
        mode = "strict=True" if options.strict else "on_mismatch='raise'"
        raise RuntimeError(
            f"FuseOnExport({mode}): {detail}. The original network is in place. Check the fusion report, "
            "raise `tolerance` if the difference is expected, or use on_mismatch='revert' to continue."
        )
    if options.on_mismatch == "warn":
        warn(trainer, f"FuseOnExport(on_mismatch='warn'): {detail}. Using the fused network anyway.")
    else:
        warn(trainer, f"FuseOnExport(on_mismatch='revert'): {detail}. Reverted to the original network.")


def trainer_fn(trainer: Any) -> str:
    """The running Trainer call: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``."""
    fn = trainer.state.fn
    return str(fn.value if hasattr(fn, "value") else fn)


def info(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        rank_zero_info(message)


def warn(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        rank_zero_warn(message)


def jsonable(value: Any) -> Any:
    """Plain data only, so callback state and reports load with ``torch.load(weights_only=True)`` and JSON.

    Example:
        >>> jsonable({"outcome": Outcome.FUSED, "diff": float("inf"), 1: torch.tensor(0.5)})
        {'outcome': 'fused', 'diff': 'inf', '1': 0.5}
    """
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)

"""Fuse one model of every timm family (built without weights) and report what was folded, merged and left.

For each model: BatchNorm kernels run before and after ``fx_lightning.fuse``, convolutions before and after
and in timm's own deploy form (``timm.utils.model.reparameterize_model``), and the fused float32 error next
to the original's own float32 error, both against a float64 run of the original (deep nets with random
BatchNorm statistics amplify rounding, so the original's error is the yardstick). Needs timm (the test extra).

    python scripts/timm_survey.py --markdown timm.md --json timm.json
    python scripts/timm_survey.py --models repvgg_a0 mobileone_s0 fastvit_t8
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fx_lightning import count_kernels, fuse
from fx_lightning.testing import randomize_batch_norm
from fx_lightning.verify.compare import relative_error

# Large language/vision-language and plain-ViT families: no BatchNorm, and slow to build.
SKIPPED_FAMILIES = frozenset(
    {"aimv", "beit", "beitv", "cait", "deepseek", "deit", "eva", "flexivit", "gemma", "hiera", "hieradet", "mvitv",
     "naflexvit", "qwen", "sam", "samvit", "test", "vit"}
)  # fmt: skip
_SMALL = ("atto", "femto", "pico", "nano", "tiny", "small", "_s0", "_t8", "050", "a0", "_b0", "100", "18", "_xs")


@dataclass
class Row:
    """What fuse did to one timm model."""

    family: str
    model: str
    input_size: int = 0
    bn_before: int = 0
    bn_after: int = 0
    bn_deploy: int | None = None
    conv_before: int = 0
    conv_after: int = 0
    conv_deploy: int | None = None
    error: float = 0.0
    own_error: float = 0.0
    skipped: int = 0
    untraced: int = 0
    merged: int = 0
    reasons: list[str] = field(default_factory=list)
    failure: str = ""
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        """Whether the fused error is within 1.5x the original's own float32 error (+1e-6)."""
        return self.error <= 1.5 * self.own_error + 1e-6


def family_representatives(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(family, model)`` for one small model per family (family: the name up to the first digit or ``_``)."""
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(re.split(r"[_\d]", name)[0], []).append(name)
    picks = []
    for family, members in families.items():
        if family in SKIPPED_FAMILIES:
            continue
        picks.append((family, min(members, key=lambda n: (not any(s in n for s in _SMALL), len(n), n))))
    return picks


class _Timeout(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _Timeout


def survey_model(family: str, name: str, size: int, use_example_inputs: bool) -> Row:
    """Build ``name`` without weights, randomise its BatchNorm statistics, fuse it and measure."""
    import timm
    from timm.utils.model import reparameterize_model

    row = Row(family, name)
    begin = time.perf_counter()
    torch.manual_seed(0)
    model: nn.Module = timm.create_model(name, pretrained=False).eval()
    randomize_batch_norm(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        try:
            reference = model(x)
        except Exception:  # noqa: BLE001 - a model that needs its own input size gets it
            x = torch.randn(2, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
            reference = model(x)
        row.input_size = x.shape[-1]
        truth = copy.deepcopy(model).double()(x.double())
        row.own_error = relative_error(truth, reference.double())
        fused = fuse(model, example_inputs=(x,) if use_example_inputs else None)
        row.error = relative_error(truth, fused(x).double())
        row.bn_before, row.bn_after = count_kernels(model, x), count_kernels(fused, x)
        row.conv_before, row.conv_after = (
            count_kernels(model, x, keyword="conv"),
            count_kernels(fused, x, keyword="conv"),
        )
        try:
            deploy = reparameterize_model(copy.deepcopy(model))
            row.conv_deploy, row.bn_deploy = count_kernels(deploy, x, keyword="conv"), count_kernels(deploy, x)
        except Exception:  # noqa: BLE001 - timm's deploy form is a comparison, not the subject
            pass
    report = fused.fusion_report
    row.skipped, row.untraced, row.merged = report.num_skipped, len(report.untraced), len(report.merged)
    row.reasons = sorted({re.sub(r"'[^']*'", "'...'", s.reason) for s in report.skipped})[:3]
    row.seconds = time.perf_counter() - begin
    return row


def markdown(rows: Sequence[Row]) -> str:
    """A summary and one table row per model."""
    done = [r for r in rows if not r.failure]
    with_bn = [r for r in done if r.bn_before]
    lines = [
        f"timm models surveyed: {len(rows)} (failures: {len(rows) - len(done)}); with BatchNorm kernels: "
        f"{len(with_bn)}; all folded: {sum(r.bn_after == 0 for r in with_bn)}; "
        f"BatchNorm kernels {sum(r.bn_before for r in done)} -> {sum(r.bn_after for r in done)}; "
        f"as exact as the original (fused error <= 1.5x its own float32 error): {sum(r.exact for r in done)} "
        f"of {len(done)}; fewer convolutions than timm's deploy form: "
        f"{sum(r.conv_deploy is not None and r.conv_after < r.conv_deploy for r in done)}, more: "
        f"{sum(r.conv_deploy is not None and r.conv_after > r.conv_deploy for r in done)}.",
        "",
        "| model | input | BN kernels | BN in timm deploy | convs | convs in timm deploy | fused error | own error | "
        "left because |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.failure:
            lines.append(f"| {r.model} | | | | | | | | failed: {r.failure} |")
            continue
        lines.append(
            f"| {r.model} | {r.input_size} | {r.bn_before} -> {r.bn_after} | {r.bn_deploy} | "
            f"{r.conv_before} -> {r.conv_after} | {r.conv_deploy} | {r.error:.1e} | {r.own_error:.1e} | "
            f"{'; '.join(r.reasons)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the survey; returns the process exit code (1 if any model failed or came out inexact)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="timm model names [one per family]")
    parser.add_argument("--size", type=int, default=64, help="input height and width, where the model accepts it")
    parser.add_argument("--no-example-inputs", action="store_true", help="fuse without example_inputs")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model before it counts as failed")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown report here")
    parser.add_argument("--json", type=Path, default=None, help="write every row as JSON here")
    args = parser.parse_args(argv)
    try:
        import timm
    except ImportError:
        parser.error('timm is not installed. Install the test extra: pip install -e ".[test]"')
    if args.size < 1 or args.timeout < 1:
        parser.error(f"--size {args.size} --timeout {args.timeout}: expected positive integers.")
    known = set(timm.list_models())
    unknown = [n for n in args.models or [] if n not in known]
    if unknown:
        parser.error(f"--models {' '.join(unknown)}: not timm model names (see timm.list_models()).")
    picks = (
        [(re.split(r"[_\d]", n)[0], n) for n in args.models] if args.models else family_representatives(sorted(known))
    )
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    rows: list[Row] = []
    for i, (family, name) in enumerate(picks, 1):
        signal.alarm(args.timeout)
        try:
            row = survey_model(family, name, args.size, not args.no_example_inputs)
        except _Timeout:
            row = Row(family, name, failure=f"timeout after {args.timeout}s")
        except Exception as err:  # noqa: BLE001 - one model's failure is reported, the survey goes on
            row = Row(family, name, failure=f"{type(err).__name__}: {str(err)[:200]}")
        finally:
            signal.alarm(0)
        rows.append(row)
        status = row.failure or f"BN {row.bn_before}->{row.bn_after}, error {row.error:.1e} (own {row.own_error:.1e})"
        print(f"[{i}/{len(picks)}] {name}: {status}", file=sys.stderr, flush=True)
    text = markdown(rows)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return int(any(r.failure or not r.exact for r in rows))


if __name__ == "__main__":
    sys.exit(main())

"""``FusionReport``: its one-line summary, the table ``str`` prints, the counts, ``merge`` and ``to_dict``."""

from __future__ import annotations

import json

import pytest
from torch import nn

from fx_lightning import fuse
from fx_lightning.fusion.report import Folded, FusionReport, Merged, Removed, Skipped, Untraced


def _report() -> FusionReport:
    return FusionReport(
        model="Net",
        folded=[Folded("bn1", "conv1", "fold_bn_into_preceding", ("conv1",), True, True)],
        skipped=[Skipped("layer.bn", "its input is used twice")],
        removed=[Removed("drop", "Dropout"), Removed("id", "Identity")],
        untraced=[Untraced("head", "TraceError: symbolically traced variables\nsecond line")],
        merged=[Merged("block.conv", ("conv_1x1", "identity(x)"), "merge_branches")],
        seconds=0.25,
    )


def test_report_counts() -> None:
    report = _report()
    assert (report.num_folded, report.num_skipped) == (1, 1)
    assert (FusionReport().num_folded, FusionReport().num_skipped) == (0, 0)


def test_report_summary_counts_every_kind_of_record() -> None:
    assert _report().summary() == (
        "Net: folded 1 BatchNorm, left 1, removed 2 no-op calls, 1 re-parameterised layer(s), 1 untraced part(s) "
        "in 0.25s"
    )


def test_report_summary_of_an_empty_report_names_the_model_generically() -> None:
    assert (
        FusionReport().summary()
        == "model: folded 0 BatchNorm, left 0, removed 0 no-op calls, 0 untraced part(s) in 0.00s"
    )


def test_report_summary_mentions_graphs_reverts_and_the_self_check_error_only_when_present() -> None:
    report = FusionReport(model="Net", graphs=["", "body"], reverted=["body"], max_rel_error=2.5e-7)
    assert report.summary() == (
        "Net: folded 0 BatchNorm, left 0, removed 0 no-op calls, 2 module(s) as generated code, 1 rewrite(s) reverted "
        "by the self-check, max rel error 2.5e-07 on example_inputs, 0 untraced part(s) in 0.00s"
    )


def test_report_str_is_the_summary_then_one_aligned_row_per_record() -> None:
    report = _report()
    report.graphs = [""]
    report.reverted = ["body", "head"]
    report.reverted_reasons = {"body": "max rel error 3e-2 > 1e-4"}
    report.notes = ["example_inputs were not given"]
    lines = str(report).splitlines()
    assert lines[0] == report.summary()
    assert lines[1:] == [
        "  bn1         -> conv1   fold_bn_into_preceding",
        "  layer.bn    left       its input is used twice",
        "  head        untraced   TraceError: symbolically traced variables",
        "  block.conv  <- merged  conv_1x1 + identity(x) (merge_branches)",
        "  <model>     as graph   replaced by generated code for the rewrites above",
        "  body        reverted   max rel error 3e-2 > 1e-4",
        "  head        reverted   the self-check failed with it",
        "  note: example_inputs were not given",
    ]


def test_report_str_without_records_is_the_summary_alone() -> None:
    report = FusionReport(model="Net")
    assert str(report) == report.summary()


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        ("x" * 120, "x" * 120),
        ("x" * 121, "x" * 117 + "..."),
        ("  \n  first line  \nsecond line", "first line  "),
        ("", ""),
        ("   \n ", ""),
    ],
)
def test_report_str_shows_the_first_line_of_an_untraced_error_cut_at_120_characters(error: str, shown: str) -> None:
    row = str(FusionReport(untraced=[Untraced("head", error)])).splitlines()[1]
    assert row == f"  head  untraced  {shown}"
    assert len(row.removeprefix("  head  untraced  ")) <= 120


def test_report_merge_names_records_under_the_prefix() -> None:
    outer = FusionReport(model="Outer", notes=["outer note"])
    inner = _report()
    inner.traced = ["", "body"]
    inner.graphs = [""]
    inner.reverted = ["body"]
    inner.notes = ["inner note"]
    inner.folded.append(Folded("bn2", "conv_a", "fold_bn_into_preceding", ("conv_a", "conv_b")))
    outer.merge(inner, "encoder")
    assert [(r.bn, r.into, r.layers, r.in_place, r.writable) for r in outer.folded] == [
        ("encoder.bn1", "encoder.conv1", ("encoder.conv1",), True, True),
        ("encoder.bn2", "encoder.conv_a, encoder.conv_b", ("encoder.conv_a", "encoder.conv_b"), False, False),
    ]
    assert outer.skipped == [Skipped("encoder.layer.bn", "its input is used twice")]
    assert [r.name for r in outer.removed] == ["encoder.drop", "encoder.id"]
    assert [r.path for r in outer.untraced] == ["encoder.head"]
    assert outer.merged == [Merged("encoder.block.conv", ("conv_1x1", "identity(x)"), "merge_branches")]
    assert outer.traced == ["encoder", "encoder.body"]  # "" (the sub-module itself) becomes the prefix
    assert outer.graphs == ["encoder"]
    assert outer.reverted == ["encoder.body"]
    assert outer.notes == ["outer note", "inner note"]


def test_report_merge_without_prefix_keeps_the_names() -> None:
    outer = FusionReport()
    outer.merge(_report(), "")
    assert [r.bn for r in outer.folded] == ["bn1"]
    assert [r.path for r in outer.untraced] == ["head"]


def test_report_to_dict_is_json_and_holds_every_field() -> None:
    report = _report()
    report.reverted_reasons = {"body": "why"}
    report.max_rel_error = 1e-6
    data = json.loads(json.dumps(report.to_dict()))
    assert data["model"] == "Net"
    assert data["folded"] == [
        {
            "bn": "bn1",
            "into": "conv1",
            "rule": "fold_bn_into_preceding",
            "layers": ["conv1"],
            "in_place": True,
            "writable": True,
        }
    ]
    assert data["skipped"] == [{"bn": "layer.bn", "reason": "its input is used twice"}]
    assert data["removed"] == [{"name": "drop", "kind": "Dropout"}, {"name": "id", "kind": "Identity"}]
    assert data["untraced"][0]["error"].endswith("second line")  # the full error, not the first line
    assert data["merged"] == [{"into": "block.conv", "consumed": ["conv_1x1", "identity(x)"], "rule": "merge_branches"}]
    assert data["reverted_reasons"] == {"body": "why"}
    assert data["max_rel_error"] == 1e-6
    assert data["seconds"] == 0.25
    assert set(data) == set(FusionReport.__dataclass_fields__)


def test_report_to_dict_returns_copies() -> None:
    report = FusionReport(traced=["a"], notes=["n"])
    data = report.to_dict()
    data["traced"].append("b")
    data["notes"].clear()
    assert report.traced == ["a"]
    assert report.notes == ["n"]


def test_report_records_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Skipped("bn", "why").reason = "other"  # type: ignore[misc]


def test_report_of_a_real_fusion_counts_what_was_done() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(), nn.ReLU()).eval()
    report = fuse(net).fusion_report
    assert report.num_folded == 1
    assert [(r.bn, r.into) for r in report.folded] == [("1", "0")]
    assert "folded 1 BatchNorm" in report.summary()
    assert "  1  -> 0" in str(report)

"""Structural properties behind fused speed on the benchmark models, and a smoke run of scripts/benchmark.py.

Not timing tests: a fused graph at the folding limit has no BatchNorm, no no-op calls left, the same
calls in the same order as the network with every BatchNorm replaced by Identity, and weights laid out
as the original's. Those are what make the fused model as fast as the limit, whatever the machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import benchmarking
from benchmarking import (
    balanced_orders,
    bn_to_identity,
    interleaved_timings,
    markdown_table,
    measure_fusion,
    paired_ratio_interval,
    retained_extra_bytes,
)
from fx_lightning import count_kernels, fuse
from fx_lightning.fusion.tracing import trace
from fx_lightning.testing import randomize_batch_norm
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark.py"
# resnet50 (25M parameters) is the slowest to fuse; the others cover its bottleneck block's structure too.
BENCHMARK_MODELS = [
    "resnet18",
    pytest.param("resnet50", marks=pytest.mark.slow),
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
]
SIZE = 64
RTOL = 1e-5
_NO_OP_MODULES = (nn.modules.dropout._DropoutNd, nn.Identity)
_NO_OP_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.dropout,
    torchvision.ops.stochastic_depth,
}
_BN_FUNCTIONS = {F.batch_norm, torch.batch_norm}


def _load_script():
    return load_script("benchmark.py")


@pytest.fixture(scope="module")
def benchmark_script():
    return _load_script()


def _build(name: str, memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    randomize_batch_norm(model)
    return model.to(memory_format=memory_format)


def _call_signature(gm: fx.GraphModule) -> list[str]:
    """What each node computes, by layer type or function name, skipping no-op modules and graph plumbing."""
    calls = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, _NO_OP_MODULES):
                calls.append(type(module).__name__)
        elif node.op in ("call_function", "call_method") and node.target not in _NO_OP_FUNCTIONS:
            calls.append(getattr(node.target, "__name__", str(node.target)))
    return calls


def _leftovers(gm: fx.GraphModule) -> list[str]:
    left = []
    for node in gm.graph.nodes:
        no_op_module = node.op == "call_module" and isinstance(
            gm.get_submodule(node.target), (_BatchNorm, *_NO_OP_MODULES)
        )
        if no_op_module or (node.op == "call_function" and node.target in _NO_OP_FUNCTIONS | _BN_FUNCTIONS):
            left.append(node.format_node())
    return left


def _memory_format(weight: torch.Tensor) -> torch.memory_format:
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_fused(name: str, memory_format: torch.memory_format) -> None:
    model = _build(name, memory_format)
    limit = bn_to_identity(model)
    # The default form is the limit itself: the model's own classes, each BatchNorm an Identity.
    fused = fuse(model)
    assert type(fused) is type(model)
    assert fused.fusion_report.skipped == []
    assert fused.fusion_report.graphs == []
    assert [type(m) for m in fused.modules()] == [type(m) for m in limit.modules()]
    # The graph form runs the limit's calls, without the no-op ones.
    graph = fuse(model, form="graph")
    assert isinstance(graph, fx.GraphModule), f"{name} was not traced whole: {graph.fusion_report}"
    assert graph.fusion_report.skipped == []
    assert _leftovers(graph) == []
    assert _call_signature(graph) == _call_signature(trace(limit).graph_module)  # in-place adds stay in place

    x = torch.randn(2, 3, SIZE, SIZE).to(memory_format=memory_format)
    for net in (fused, graph):
        layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert layers
        for path, layer in layers:
            # A folded call site of a shared layer gets a sibling named '<path>_folded<k>'.
            original = model.get_submodule(path.split("_folded")[0])
            expected = _memory_format(original.weight)
            assert layer.weight.is_contiguous(memory_format=expected), f"{path}: weight strides {layer.weight.stride()}"
            assert layer.weight.stride() == original.weight.stride(), path
        with torch.inference_mode():
            ref, out = model(x), net(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=RTOL * ref.abs().max().item())
        assert count_kernels(net, x) == 0


@pytest.mark.parametrize("name", BENCHMARK_MODELS)
def test_fused_benchmark_model_is_at_folding_limit(name: str) -> None:
    _check_fused(name, torch.contiguous_format)


def test_fused_benchmark_model_keeps_channels_last_weights() -> None:
    _check_fused("resnet18", torch.channels_last)


def test_fused_efficientnet_has_no_stochastic_depth_calls() -> None:
    fused = fuse(_build("efficientnet_b0"), form="graph")
    left = [n.format_node() for n in fused.graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth"]
    assert left == []


def test_bn_to_identity_replaces_every_batch_norm_and_keeps_original() -> None:
    model = _build("mobilenet_v3_large")
    limit = bn_to_identity(model)
    assert not any(isinstance(m, _BatchNorm) for m in limit.modules())
    assert sum(isinstance(m, _BatchNorm) for m in model.modules()) == 46
    assert limit.features[0][0].weight.data_ptr() != model.features[0][0].weight.data_ptr()


def test_retained_extra_bytes_counts_only_unshared_storage() -> None:
    model = _build("resnet18")
    fused = fuse(model)
    convs = sum(m.weight.nbytes + m.out_channels * 4 for m in fused.modules() if isinstance(m, nn.Conv2d))
    # Folded convolutions own new weights and biases; the classifier is shared with the original.
    assert retained_extra_bytes(fused, model) == convs
    assert retained_extra_bytes(model, model) == 0


def test_interleaved_timings_rejects_unknown_reference() -> None:
    with pytest.raises(ValueError, match=r"reference='missing'\) is not one of the variants \['a'\]"):
        interleaved_timings({"a": lambda: None}, "missing", torch.device("cpu"))


def test_interleaved_timings_rejects_inverted_round_limits() -> None:
    with pytest.raises(ValueError, match=r"min_rounds=5, max_rounds=2\) needs 1 <= min_rounds <= max_rounds"):
        interleaved_timings({"a": lambda: None}, "a", torch.device("cpu"), min_rounds=5, max_rounds=2)


def test_interleaved_timings_rotates_order_and_pairs_ratios(monkeypatch) -> None:
    # A fake clock makes the timings exact: each call advances it by its variant's cost, and the
    # reference's cost drifts upwards over time, as a machine getting busier would.
    clock = [0.0]
    calls: list[str] = []

    def variant(name: str, cost: float):
        def run() -> None:
            calls.append(name)
            clock[0] += cost * (1 + len(calls) / 100)

        return run

    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])
    out = interleaved_timings(
        {"ref": variant("ref", 1.0), "slow": variant("slow", 3.0)}, "ref", torch.device("cpu"),
        warmup=1, min_rounds=4, max_rounds=4, min_sample_s=0.0,
    )  # fmt: skip
    # warm-up and calibration run ref then slow; the timed rounds alternate which goes first.
    assert calls == ["ref", "slow", "ref", "slow", "ref", "slow", "slow", "ref", "ref", "slow", "slow", "ref"]
    assert out["ref"].ratio == 1.0
    assert len(out["slow"].samples_ms) == 4
    assert out["slow"].ratio == pytest.approx(3.0, rel=0.02)
    assert out["slow"].median_ms == pytest.approx(3000 * 1.095, rel=0.01)


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_balanced_orders_balance_first_place_and_predecessors(n: int) -> None:
    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    firsts = Counter(order[0] for order in orders)
    pairs = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    assert len(firsts) == n
    assert len(set(firsts.values())) == 1
    assert len(pairs) == n * (n - 1)
    assert len(set(pairs.values())) == 1


def test_paired_ratio_interval_brackets_the_median_ratio() -> None:
    reference = [1.0, 2.0, 4.0, 8.0, 16.0] * 4
    noisy = [r * f for r, f in zip(reference, [0.9, 1.1, 1.0, 0.95, 1.05] * 4)]
    low, high = paired_ratio_interval(noisy, reference)
    assert 0.9 <= low <= 1.0 <= high <= 1.1  # median ratio 1.0, spread 0.9-1.1
    assert paired_ratio_interval([x * 1.5 for x in reference], reference) == (1.5, 1.5)
    assert paired_ratio_interval(noisy, reference) == (low, high)  # fixed seed: reproducible


@pytest.mark.parametrize(
    ("samples", "reference", "kwargs", "message"),
    [
        ([], [], {}, r"got 0 samples and 0 reference samples"),
        ([1.0, 2.0], [1.0], {}, r"got 2 samples and 1 reference samples"),
        ([1.0, 0.0], [1.0, 1.0], {}, r"needs positive times"),
        ([1.0], [1.0], {"confidence": 1.0}, r"confidence=1\.0\) must lie strictly between 0 and 1"),
    ],
)
def test_paired_ratio_interval_rejects_bad_samples(samples, reference, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        paired_ratio_interval(samples, reference, **kwargs)


def test_measure_fusion_rejects_unknown_fuser() -> None:
    with pytest.raises(ValueError, match=r"measure_fusion\(fuser='tvm'\) is not a known fuser"):
        measure_fusion("resnet18", "tvm")


def test_markdown_table_has_one_line_per_row() -> None:
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
        "| 3 | 4 |",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--models", "resnet181"],
            r"--models resnet181: not a torchvision classification model nor one of repvgg_net, mobileone_net\. "
            r"Did you mean res",
        ),
        (["--batch-sizes", "0", "8"], r"--batch-sizes 0 8: expected positive integers, got \[0\]"),
        (["--dtypes", "float8"], r"--dtypes float8: unknown dtype; choose from float32, bfloat16, float16"),
        (["--device", "cpu", "--dtypes", "float16"], r"--dtypes float16 is only supported with --device cuda"),
        (["--device", "tpu"], r"--device tpu: not a device; use cpu, cuda, cuda:N or auto"),
        (["--min-rounds", "9", "--max-rounds", "3"], r"--min-rounds 9 --max-rounds 3: min-rounds must not exceed"),
        (["--threads", "0"], r"--threads 0: expected positive integers"),
    ],
)
def test_benchmark_options_reject_bad_values(benchmark_script, argv: list[str], message: str) -> None:
    args = benchmark_script.build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=message):
        benchmark_script.validate(args)


def test_benchmark_options_require_matplotlib_for_plot(benchmark_script, monkeypatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    args = benchmark_script.build_parser().parse_args(["--plot", str(tmp_path / "b.png")])
    with pytest.raises(ValueError, match=r'matplotlib is not installed\. .*pip install "fx-lightning\[plot\]"'):
        benchmark_script.validate(args)


def _run_quick(tmp_path: Path, *extra: str, models: tuple[str, ...] = ("resnet18",)) -> tuple[str, dict, str]:
    md_path, json_path = tmp_path / "bench.md", tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", *models, "--batch-sizes", "1", "--size", "32"]
    cmd += ["--markdown", str(md_path), "--json", str(json_path), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return md_path.read_text(), json.loads(json_path.read_text()), done.stdout


def _table(markdown: str, first_column: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if rows and cells[0] == first_column:
            break
        rows.append(cells)
    return [rows[0], *rows[2:]]


def test_benchmark_quick_writes_markdown_and_json(tmp_path: Path) -> None:
    markdown, data, stdout = _run_quick(tmp_path, "--no-onnx")
    assert markdown in stdout

    latency = _table(markdown, "model")
    assert latency[0] == [
        "model", "batch", "dtype", "eval (ms)", "fx_lightning.fuse", "torch.fx fuse", "BN->Identity limit",
        "fuse / floor [95%]", "vs floor", "fuse / torch.fx", "rounds",
    ]  # fmt: skip
    assert [row[:3] for row in latency[1:]] == [["resnet18", "1", "float32"]]
    assert latency[1][-1] == "3"

    work = _table(markdown.split("## Work per forward", 1)[1], "model")
    assert work[0] == ["model", "batch", "dtype", "eval", "fx_lightning.fuse", "torch.fx fuse", "floor", "floor is"]
    assert [row[:3] + row[-1:] for row in work[1:]] == [["resnet18", "1", "float32", "BN->Identity limit"]]

    (case,) = data["cases"]
    # resnet18: 20 convolutions and 20 BatchNorms in eval; folding removes exactly the 20 BatchNorm kernels.
    ops = {k: v["aten_ops"] for k, v in case["work"].items()}
    assert ops["eval"] - ops["fx_lightning.fuse"] == 20
    assert ops["fx_lightning.fuse"] == ops["torch.fx fuse"] == ops["BN->Identity limit"]
    assert {v["convolutions"] for v in case["work"].values()} == {20}
    assert case["floor"] == "BN->Identity limit"
    low, high = case["fuse_over_floor_interval"]
    assert low <= case["fuse_over_floor"] <= high
    assert case["floor_verdict"] == ("faster" if high < 1 else "slower" if low > 1 else "same within noise")
    assert set(case["variants"]) == {"eval", "fx_lightning.fuse", "torch.fx fuse", "BN->Identity limit"}
    assert all(len(v["samples_ms"]) == 3 and v["median_ms"] > 0 for v in case["variants"].values())
    assert case["variants"]["eval"]["ratio"] == 1.0
    assert case["relative_error"]["fx_lightning.fuse"] < 1e-5
    assert data["meta"]["threads"] == 2
    assert data["meta"]["load_before"] is not None

    assert [(c["model"], c["fuser"]) for c in data["fusion"]] == [
        ("resnet18", "fx_lightning.fuse"),
        ("resnet18", "torch.fx fuse"),
    ]
    ours, reference = data["fusion"]
    assert ours["error"] == ""
    assert len(ours["seconds"]) == 1
    # Our fuse shares the classifier with the original; torch.fx fuse deep-copies everything.
    assert ours["retained_tensor_bytes"] < reference["retained_tensor_bytes"] <= reference["model_bytes"]
    assert ours["peak_extra_bytes"] is not None
    assert ours["peak_extra_bytes"] > 0
    fusion = _table(markdown.split("## Fusion cost", 1)[1], "model")
    assert fusion[0][:3] == ["model", "fuser", "fusion time (s)"]
    assert [row[:2] for row in fusion[1:]] == [["resnet18", "fx_lightning.fuse"], ["resnet18", "torch.fx fuse"]]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_benchmark_quick_times_onnx_runtime_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    markdown, data, _ = _run_quick(tmp_path, "--no-fusion-cost", "--plot", str(tmp_path / "bench.png"))
    assert "ONNX Runtime (fused)" in _table(markdown, "model")[0]
    assert data["cases"][0]["relative_error"]["ONNX Runtime (fused)"] < 1e-5
    assert data["fusion"] == []
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_quick_compares_reparam_nets_with_their_hand_written_deploy_form(tmp_path: Path) -> None:
    markdown, data, _ = _run_quick(tmp_path, "--no-onnx", models=("repvgg_net", "mobileone_net"))
    latency = _table(markdown, "model")
    assert "hand-written deploy" in latency[0]
    assert "BN->Identity limit" not in latency[0]
    convs = {}
    for case in data["cases"]:
        assert case["floor"] == "hand-written deploy"
        assert set(case["variants"]) == {"eval", "fx_lightning.fuse", "torch.fx fuse", "hand-written deploy"}
        assert case["relative_error"]["fx_lightning.fuse"] < 1e-5
        assert case["relative_error"]["hand-written deploy"] < 1e-5
        work = case["work"]
        convs[case["model"]] = {k: v["convolutions"] for k, v in work.items()}
        # Same operators as the deploy form; fewer Python calls (no per-block container call).
        assert work["fx_lightning.fuse"]["aten_ops"] == work["hand-written deploy"]["aten_ops"]
        assert work["fx_lightning.fuse"]["python_calls"] <= work["hand-written deploy"]["python_calls"]
    assert convs == {
        "repvgg_net": {"eval": 10, "fx_lightning.fuse": 5, "torch.fx fuse": 10, "hand-written deploy": 5},
        "mobileone_net": {"eval": 23, "fx_lightning.fuse": 7, "torch.fx fuse": 23, "hand-written deploy": 7},
    }
    assert data["fusion"] == []
    assert "fusion cost is measured for torchvision models only" in data["notes"]

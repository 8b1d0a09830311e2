"""Verifier/verify: metric and closeness against direct computation, batch layouts, precision, distributed sync."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import fx_lightning
from fx_lightning.testing import randomize_batch_norm
from fx_lightning.verify.verifier import (
    VerificationResult,
    Verifier,
    call_with_input,
    check_tolerance,
    default_get_input,
    default_get_target,
    preserved_rng,
    verify,
)

NUM_CLASSES = 5


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, NUM_CLASSES),
    )
    return randomize_batch_norm(net, seed).eval()


class Branchy(nn.Module):
    """Branches on a tensor value at the top level, so ``fuse`` falls back to fusing its children."""

    def __init__(self) -> None:
        super().__init__()
        self.a = tiny_net(1)
        self.b = tiny_net(2)

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


def make_batches(n: int = 3, size: int = 8, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 6, 6, generator=gen), torch.randint(0, NUM_CLASSES, (size,), generator=gen))
        for _ in range(n)
    ]


def reference_accuracy(net: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    metric = MulticlassAccuracy(num_classes=NUM_CLASSES)
    with torch.no_grad():
        for x, y in batches:
            metric.update(net(x), y)
    return float(metric.compute())


# ----------------------------------------------------------------------------------------- batch layouts


def test_default_get_input_layouts() -> None:
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert default_get_input(x) is x
    assert default_get_input((x, y)) is x
    assert default_get_input([x, y]) is x
    for key in ("x", "input", "inputs", "image", "images", "pixel_values"):
        assert default_get_input({key: x, "label": y}) is x
    images = (torch.zeros(3, 4, 4), torch.zeros(3, 5, 5))  # the detection collate: tuple(zip(*samples))
    assert default_get_input((images, ({}, {}))) == (images,)  # one argument, the whole tuple


def test_default_get_target_layouts() -> None:
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert default_get_target((x, y)) is y
    assert default_get_target([x, y]) is y
    assert default_get_target((x,)) is None
    assert default_get_target(x) is None
    for key in ("y", "target", "targets", "label", "labels"):
        assert default_get_target({"x": x, key: y}) is y
    assert default_get_target({"x": x}) is None


def test_default_get_input_unknown_dict_raises() -> None:
    with pytest.raises(TypeError, match=r"found none of the input keys .* keys \['pixels'\]\. Pass get_input="):
        default_get_input({"pixels": torch.zeros(1)})


@pytest.mark.parametrize("batch", [3, (), "text"])
def test_default_get_input_unsupported_batch_raises(batch: Any) -> None:
    with pytest.raises(TypeError, match=r"cannot find the input in a batch of type .*Pass get_input="):
        default_get_input(batch)


def test_default_get_target_unsupported_batch_raises() -> None:
    with pytest.raises(TypeError, match=r"cannot find the target in a batch of type int.*Pass get_target="):
        default_get_target(3)


# ----------------------------------------------------------------------------------------- results


def test_verify_matches_direct_computation() -> None:
    net = tiny_net()
    fused = fx_lightning.fuse(net)
    batches = make_batches()
    result = verify(net, fused, batches)
    assert isinstance(result, VerificationResult)
    assert result.passed
    assert result.num_samples == 24
    assert result.metric_original == {"MulticlassAccuracy": pytest.approx(reference_accuracy(net, batches), abs=1e-7)}
    assert result.metric_fused == {"MulticlassAccuracy": pytest.approx(reference_accuracy(fused, batches), abs=1e-7)}
    with torch.no_grad():
        expected = max(float((net(x) - fused(x)).abs().max()) for x, _ in batches)
        agree = torch.cat([net(x).argmax(1) == fused(x).argmax(1) for x, _ in batches]).float().mean()
    assert result.max_abs_diff == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert result.max_abs_diff < 1e-5
    assert result.top1_agreement == pytest.approx(float(agree))
    assert result.notes == []


def test_verify_detects_changed_outputs() -> None:
    net = tiny_net()
    broken = tiny_net(seed=7)  # a different function with the same shapes
    batches = make_batches(n=4, size=16)
    acc_net, acc_broken = reference_accuracy(net, batches), reference_accuracy(broken, batches)
    assert acc_net != acc_broken  # the reference itself shows the difference
    result = verify(net, broken, batches, tolerance=abs(acc_net - acc_broken) / 2)
    assert not result.passed
    assert result.max_abs_diff > 1e-3
    assert result.metric_diff["MulticlassAccuracy"] == pytest.approx(abs(acc_net - acc_broken), abs=1e-6)
    assert "FAILED" in str(result)


def test_verify_negative_tolerance_always_fails() -> None:
    net = tiny_net()
    result = verify(net, net, make_batches(n=1), tolerance=-1e-9)
    assert result.max_abs_diff == 0.0
    assert result.metric_original == result.metric_fused
    assert not result.passed
    no_target = verify(net, net, [x for x, _ in make_batches(n=1)], tolerance=-1e-9)
    assert not no_target.passed


def test_verify_without_targets_checks_outputs_only() -> None:
    net = tiny_net()
    fused = fx_lightning.fuse(net)
    batches = [x for x, _ in make_batches()]
    result = verify(net, fused, batches)
    assert result.metric_original == {}
    assert result.metric_fused == {}
    assert result.passed
    assert any("no targets" in note for note in result.notes)
    shifted = verify(net, lambda x: fused(x) + 0.01, batches)
    assert shifted.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    assert not shifted.passed  # 0.01 > tolerance 1e-3


def test_verify_output_tolerance_is_enforced_with_targets() -> None:
    net = tiny_net()
    # a constant shift keeps every argmax, hence the accuracy, but moves the outputs
    result = verify(net, lambda x: net(x) + 0.5, make_batches(), output_tolerance=0.1)
    assert result.metric_original == result.metric_fused
    assert result.top1_agreement == 1.0
    assert result.max_abs_diff == pytest.approx(0.5, rel=1e-5)
    assert not result.passed
    assert "(tolerance 0.1)" in str(result)


def test_verify_metric_collection_and_per_class_values() -> None:
    net = tiny_net()
    fused = fx_lightning.fuse(net)
    metric = MetricCollection(
        {"acc": MulticlassAccuracy(num_classes=NUM_CLASSES), "f1": MulticlassF1Score(num_classes=NUM_CLASSES)}
    )
    result = verify(net, fused, make_batches(), metric=metric)
    assert set(result.metric_original) == {"acc", "f1"}
    per_class = verify(net, fused, make_batches(), metric=MulticlassAccuracy(num_classes=NUM_CLASSES, average=None))
    assert list(per_class.metric_original) == [f"MulticlassAccuracy[{i}]" for i in range(NUM_CLASSES)]
    assert per_class.passed


def test_verify_regression_metric_on_non_logit_outputs() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    randomize_batch_norm(net)
    fused = fx_lightning.fuse(net)
    x = torch.randn(2, 1, 5, 5)
    target = torch.randn(2, 2, 3, 3)
    result = verify(
        net,
        fused,
        [(x.flatten(1), target.flatten())],
        metric=MeanSquaredError(),
        get_input=lambda b: b[0].reshape(2, 1, 5, 5),
        get_target=lambda b: b[1].reshape(2, 2, 3, 3),
    )
    with torch.no_grad():
        expected = float(((net.eval()(x) - target) ** 2).mean())
    assert result.metric_original["MeanSquaredError"] == pytest.approx(expected, rel=1e-5)
    assert result.top1_agreement is None
    assert any("top-1 agreement not computed" in note for note in result.notes)


def test_verify_without_a_fitting_default_metric_compares_outputs_and_says_so() -> None:
    net = nn.Linear(3, 1)
    result = verify(net, net, [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))])
    assert result.passed
    assert result.metric_original == {}
    assert any("no default metric fits outputs a tensor of shape (4, 1) with targets" in n for n in result.notes)


@pytest.mark.parametrize(
    ("outputs", "target", "expected"),
    [
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), "MulticlassAccuracy"),
        ((torch.randn(4, 3), torch.randn(4, 8)), torch.tensor([0, 1, 2, 0]), "MulticlassAccuracy"),
        ({"out": torch.randn(2, 3, 4, 4), "aux": torch.randn(2, 3, 4, 4)}, torch.zeros(2, 4, 4).long(), "Jaccard"),
        (torch.randn(4, 2), torch.randn(4, 2), "MeanSquaredError"),
        (torch.randn(4, 3), torch.randn(4), None),
        ([{"boxes": torch.zeros(1, 4)}], [{"boxes": torch.zeros(1, 4)}], None),
    ],
)
def test_default_metric_chosen_from_outputs_and_targets(outputs: Any, target: Any, expected: str | None) -> None:
    from fx_lightning.verify.verifier import default_metric

    metric = default_metric(outputs, target)
    assert (None if metric is None else type(metric).__name__.replace("MulticlassJaccardIndex", "Jaccard")) == expected


class Detector(nn.Module):
    """Returns a list of detection dicts, one per image, as torchvision's detectors do in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for image in images:
            features = self.body(image[None]).mean(dim=(2, 3))[0]
            out.append({"boxes": features[:4].reshape(1, 4), "scores": features[:1], "labels": torch.ones(1).long()})
        return out


def test_verify_list_of_dict_outputs_compared_leaf_by_leaf() -> None:
    net = randomize_batch_norm(Detector()).eval()
    images = [torch.randn(3, 8, 8), torch.randn(3, 6, 6)]
    batches = [(images, [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1).long()}] * 2)]
    result = verify(net, fx_lightning.fuse(net), batches, get_input=lambda b: (b[0],))
    assert result.passed
    assert result.num_samples == 2
    assert result.max_abs_diff < 1e-5
    # detection dicts with detection targets: MeanAveragePrecision is the default metric
    assert "MeanAveragePrecision.map" in result.metric_original
    assert result.metric_original == result.metric_fused


def test_compare_outputs_structure_and_values() -> None:
    from fx_lightning.verify.verifier import compare_outputs

    assert compare_outputs((torch.ones(2), 3), (torch.ones(2), 3)) == 0.0
    assert compare_outputs((torch.ones(2), 3), (torch.ones(2), 4)) == math.inf
    assert compare_outputs(torch.tensor([1.0]), torch.tensor([math.nan])) == math.inf
    with pytest.raises(ValueError, match=r"original network returned a dict with keys \['a'\] but the fused one a"):
        compare_outputs({"a": torch.ones(1)}, torch.ones(1))


def test_verify_without_targets_needs_no_class_dimension() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1))  # one channel: no MulticlassAccuracy possible
    randomize_batch_norm(net)
    result = verify(net, fx_lightning.fuse(net), [torch.randn(2, 1, 5, 5)])
    assert result.passed
    assert result.metric_original == {}


def test_verify_max_batches_and_dict_batches() -> None:
    net = tiny_net()
    batches = [{"image": x, "label": y} for x, y in make_batches(n=5, size=4)]
    result = verify(net, net, iter(batches), max_batches=2)
    assert result.num_samples == 8


def test_verify_fused_fallback_module_with_graphmodule_children() -> None:
    model = Branchy().eval()
    fused = fx_lightning.fuse(model)
    assert not isinstance(fused, torch.fx.GraphModule)
    assert type(fused.a) is nn.Sequential  # under an untraced parent, children keep their classes
    batches = make_batches() + [(x.abs(), y) for x, y in make_batches(seed=1)]  # both branches
    result = verify(model, fused, batches)
    assert result.passed
    assert result.max_abs_diff < 1e-5


def test_verifier_runs_networks_in_eval_and_restores_train_mode() -> None:
    net = tiny_net().train()
    stats = net[1].running_mean.clone()
    verifier = Verifier()
    verifier.update(net, fx_lightning.fuse(net), make_batches(n=1)[0])
    assert net.training
    assert net[1].training
    torch.testing.assert_close(net[1].running_mean, stats, rtol=0, atol=0)  # eval mode: no statistics update
    assert verifier.compute().max_abs_diff < 1e-5


def test_verifier_casts_inputs_for_low_precision_network() -> None:
    net = tiny_net()
    half = fx_lightning.fuse(net).to(torch.bfloat16)
    batches = make_batches()
    verifier = Verifier(tolerance=0.2)
    for batch in batches:
        verifier.update(net, half, batch)
    result = verifier.compute()
    with torch.no_grad():
        expected = max(float((net(x) - half(x.bfloat16()).float()).abs().max()) for x, _ in batches)
    assert 0 < result.max_abs_diff == pytest.approx(expected, rel=1e-6)
    assert result.max_abs_diff < 0.1  # bfloat16 keeps ~3 significant digits
    assert verifier.metric_original.device.type == "cpu"


def test_verifier_tuple_input_and_dict_output() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, NUM_CLASSES)

        def forward(self, a: Tensor, b: Tensor) -> dict[str, Tensor]:
            return {"logits": self.fc(a + b), "aux": a}

    net = TwoInputs()
    batch = {"inputs": (torch.randn(4, 3), torch.randn(4, 3)), "targets": torch.tensor([0, 1, 2, 3])}
    result = verify(net, net, [batch])
    assert result.num_samples == 4
    assert result.metric_original == result.metric_fused


def test_verifier_reset_and_compute_before_update() -> None:
    net = tiny_net()
    verifier = Verifier()
    with pytest.raises(RuntimeError, match=r"compute\(\) was called before any batch was seen"):
        verifier.compute()
    verifier.update(net, net, make_batches(n=1)[0])
    assert verifier.compute().num_samples == 8
    verifier(net, net, make_batches(n=1)[0])  # forward == update
    assert verifier.compute().num_samples == 16
    verifier.reset()
    with pytest.raises(RuntimeError, match=r"before any batch was seen"):
        verifier.compute()


def test_verifier_nan_outputs_fail() -> None:
    net = tiny_net()
    result = verify(net, lambda x: net(x) * math.nan, make_batches(n=1))
    assert math.isinf(result.max_abs_diff)
    assert not result.passed


def test_verification_result_to_dict_and_str() -> None:
    net = tiny_net()
    result = verify(net, fx_lightning.fuse(net), make_batches())
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) >= {
        "metric_original",
        "metric_fused",
        "max_abs_diff",
        "top1_agreement",
        "num_samples",
        "tolerance",
        "passed",
    }
    text = str(result)
    assert text.startswith("verification PASSED on 24 samples")
    assert "MulticlassAccuracy" in text
    assert "top-1 agreement 100.00%" in text


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tolerance": "1e-3"}, TypeError, r"Verifier\(tolerance='1e-3'\) expects a number, got str"),
        ({"tolerance": True}, TypeError, r"Verifier\(tolerance=True\) expects a number"),
        ({"tolerance": math.nan}, ValueError, r"Verifier\(tolerance=nan\) expects a number"),
        ({"output_tolerance": "x"}, TypeError, r"Verifier\(output_tolerance='x'\) expects a number"),
        ({"metric": "accuracy"}, TypeError, r"expects a torchmetrics Metric or MetricCollection, got str"),
        ({"metric": nn.Linear(1, 1)}, TypeError, r"expects a torchmetrics Metric or MetricCollection, got Linear"),
        ({"get_input": 0}, TypeError, r"Verifier\(get_input=...\) expects a function of the batch, got int"),
        ({"get_target": "y"}, TypeError, r"Verifier\(get_target=...\) expects a function of the batch, got str"),
    ],
)
def test_verifier_invalid_arguments_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Verifier(**kwargs)


def test_verifier_update_errors() -> None:
    net = tiny_net()
    batch = make_batches(n=1)[0]
    verifier = Verifier()
    with pytest.raises(TypeError, match=r"update\(fused=...\) expects a network .* got str"):
        verifier.update(net, "net", batch)
    with pytest.raises(ValueError, match=r"original network returned shape \(8, 5\) but the fused one \(8, 4\)"):
        verifier.update(net, lambda x: net(x)[:, :4], batch)
    with pytest.raises(ValueError, match=r"original network returned a tensor of shape \(8, 5\) but the fused one str"):
        verifier.update(net, lambda x: "logits", batch)


def test_verifier_metric_with_unusable_compute_raises() -> None:
    class Words(Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("n", default=torch.tensor(0.0), dist_reduce_fx="sum")

        def update(self, preds: Tensor, target: Tensor) -> None:
            self.n += preds.shape[0]

        def compute(self) -> Any:
            return "many"

    net = tiny_net()
    with pytest.raises(TypeError, match=r"the metric returned str for 'Words', expected tensors or numbers"):
        verify(net, net, make_batches(n=1), metric=Words())


@pytest.mark.parametrize("max_batches", [0, -1, 1.5, True])
def test_verify_invalid_max_batches_raises(max_batches: Any) -> None:
    net = tiny_net()
    with pytest.raises(ValueError, match=r"verify\(max_batches=.*\) expects a positive integer or None"):
        verify(net, net, make_batches(), max_batches=max_batches)


def test_verify_invalid_batches_raise() -> None:
    net = tiny_net()
    with pytest.raises(TypeError, match=r"expects an iterable of batches .* got Tensor.*\[batch\]"):
        verify(net, net, torch.randn(8, 1, 6, 6))
    with pytest.raises(ValueError, match=r"verify\(batches=...\) got no batches"):
        verify(net, net, [])


# ----------------------------------------------------------------------------------------- distributed


def _verify_on_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        net = tiny_net()
        fused = fx_lightning.fuse(net)
        batches = make_batches(n=4)[rank::world_size]
        verifier = Verifier()
        for batch in batches:
            verifier.update(net, fused, batch)
        result = verifier.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result.to_dict()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch and torchmetrics: 10-40 s on a shared machine
def test_verifier_compute_synchronises_across_processes(tmp_path: Path) -> None:
    world_size = 2
    mp.spawn(_verify_on_rank, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    net = tiny_net()
    single = verify(net, fx_lightning.fuse(net), make_batches(n=4)).to_dict()
    for rank in range(world_size):
        synced = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert synced["num_samples"] == single["num_samples"] == 32
        assert synced["metric_original"] == pytest.approx(single["metric_original"], abs=1e-6)
        assert synced["max_abs_diff"] == pytest.approx(single["max_abs_diff"], rel=1e-6, abs=1e-12)
        assert synced["top1_agreement"] == pytest.approx(single["top1_agreement"])


def test_preserved_rng_restores_torch_numpy_and_python() -> None:
    import random

    import numpy as np

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    with preserved_rng():
        _ = torch.rand(10), np.random.rand(10), random.random()
        list(torch.utils.data.DataLoader(list(range(4)), shuffle=True))  # a DataLoader draws from torch's generator
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_call_with_input_tuple_dict_or_single() -> None:
    def two(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - b

    def one(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["a"]

    x, y = torch.ones(1), torch.zeros(1)
    assert torch.equal(call_with_input(two, (x, y)), x)
    assert torch.equal(call_with_input(two, {"b": y, "a": x}), x)  # keyword arguments
    assert torch.equal(call_with_input(one, {"a": x}), x)  # a dict the function takes whole
    assert torch.equal(call_with_input(torch.neg, x), -x)


def test_verifier_default_metric_for_builds_it_before_any_update() -> None:
    verifier = Verifier()
    verifier.default_metric_for(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert type(verifier.metric_original).__name__ == "MulticlassAccuracy"
    assert verifier.metric_original.num_classes == 3
    verifier.default_metric_for(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))  # already built: kept
    assert verifier.metric_original.num_classes == 3
    verifier = Verifier()
    verifier.default_metric_for(torch.randn(4), torch.zeros(4).long())
    assert verifier.metric_original is None
    assert verifier.outputs_only.startswith("no default metric fits outputs a tensor of shape (4,)")


def test_verify_tolerance_checks_shared_with_the_callback() -> None:
    with pytest.raises(TypeError, match=r"Verifier\(tolerance='x'\) expects a number, got str"):
        Verifier(tolerance="x")
    with pytest.raises(ValueError, match=r"check\(tolerance=nan\) expects a number"):
        check_tolerance("check", "tolerance", float("nan"))

"""``fx_lightning.testing.randomize_batch_norm``: random BatchNorm statistics, in place, seeded, nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fx_lightning.testing import randomize_batch_norm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(16, 3),
        nn.BatchNorm1d(3, affine=False),
    )


def test_randomize_batch_norm_returns_the_same_model_changed_in_place() -> None:
    net = _net()
    assert randomize_batch_norm(net) is net
    bn = net[1]
    assert not torch.equal(bn.running_mean, torch.zeros(4))
    assert not torch.equal(bn.running_var, torch.ones(4))
    assert not torch.equal(bn.weight, torch.ones(4))
    assert not torch.equal(bn.bias, torch.zeros(4))


def test_randomize_batch_norm_ranges_keep_the_variance_and_scale_positive() -> None:
    net = randomize_batch_norm(nn.Sequential(nn.BatchNorm1d(2000)))
    bn = net[0]
    for name in ("running_var", "weight"):
        values = getattr(bn, name).detach()
        assert float(values.min()) >= 0.75, name
        assert float(values.max()) <= 1.25, name
        assert float(values.max() - values.min()) > 0.4, name  # spread over the range, not a constant
    for name in ("running_mean", "bias"):
        values = getattr(bn, name).detach()
        assert 0.05 < float(values.std()) < 0.2, name  # about 0.1 times a standard normal


def test_randomize_batch_norm_is_seeded() -> None:
    a, b, c = randomize_batch_norm(_net(), 3), randomize_batch_norm(_net(), 3), randomize_batch_norm(_net(), 4)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a[1].running_mean, c[1].running_mean)


def test_randomize_batch_norm_leaves_other_layers_and_non_affine_parameters_alone() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    randomize_batch_norm(net)
    after = net.state_dict()
    for key in ("0.weight", "0.bias", "3.weight", "3.bias", "1.num_batches_tracked", "4.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    assert net[4].weight is None
    assert net[4].bias is None
    assert not torch.equal(after["4.running_var"], before["4.running_var"])


def test_randomize_batch_norm_does_not_record_gradients_or_touch_the_global_generator() -> None:
    net = _net()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    randomize_batch_norm(net)
    assert torch.equal(torch.rand(3), expected)
    assert net[1].weight.grad_fn is None
    assert net[1].weight.requires_grad


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3)])
def test_randomize_batch_norm_covers_every_batch_norm_kind(norm: nn.Module) -> None:
    randomize_batch_norm(nn.Sequential(norm))
    assert not torch.equal(norm.running_var, torch.ones(3))


def test_randomize_batch_norm_without_running_stats_changes_only_the_affine_parameters() -> None:
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    randomize_batch_norm(bn)
    assert bn.running_mean is None
    assert not torch.equal(bn.weight, torch.ones(3))

"""swap: which networks of a LightningModule are fused, and putting fused modules in place and back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fx_lightning import fuse
from fx_lightning.lightning.networks import (
    SELF,
    Network,
    Swap,
    changed_children,
    find_networks,
    is_fused,
    named_network,
    replacements,
    restore_original,
)


def conv_bn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = conv_bn()
        self.head = nn.Linear(2, 2)
        self.nets = nn.ModuleDict({"a": conv_bn(), "plain": nn.Linear(2, 2)})
        self.blocks = nn.ModuleList([conv_bn()])


def test_find_networks_children_and_container_entries() -> None:
    assert find_networks(Holder()) == [
        Network("net", "net"),
        Network("nets.a", "nets.a"),
        Network("blocks.0", "blocks.0"),
    ]


def test_find_networks_bare_batch_norm_means_the_module_itself() -> None:
    holder = Holder()
    holder.bn = nn.BatchNorm1d(2)
    assert find_networks(holder) == [Network(SELF, "")]


def test_named_network_errors_name_the_children() -> None:
    holder = Holder()
    with pytest.raises(ValueError, match=r"Holder has no attribute 'backbone'. Its direct children are \['net', "):
        named_network(holder, "backbone")
    holder.number = 3
    with pytest.raises(TypeError, match=r"Holder.number is a int, expected a torch.nn.Module"):
        named_network(holder, "number")
    assert named_network(holder, "nets.a").module(holder) is holder.nets["a"]
    assert named_network(holder, "self").is_self


def test_state_prefix_follows_the_module_tree() -> None:
    holder = Holder()
    assert Network("nets.a", "nets.a").state_prefix(holder) == "nets.a."
    assert Network(SELF, "").state_prefix(holder) == ""


def test_swap_installs_restores_and_registers() -> None:
    holder = Holder()
    net, fused = holder.net, fuse(holder.net)
    swap = Swap(holder, {"net": fused})
    assert not is_fused(holder)
    swap.install()
    assert holder.net is fused
    assert is_fused(holder)
    with Swap(holder, {"head": nn.Identity()}):  # a temporary swap inside the loop's
        assert is_fused(holder)
        assert isinstance(holder.head, nn.Identity)
    assert is_fused(holder)  # the loop's swap is still registered
    assert restore_original(holder) is True
    assert holder.net is net
    assert not is_fused(holder)
    assert restore_original(holder) is False
    assert swap.restore() is False


def test_swap_restores_on_exception() -> None:
    holder = Holder()
    net = holder.net
    with pytest.raises(RuntimeError, match="inside"), Swap(holder, {"net": nn.Identity()}):
        raise RuntimeError("inside")
    assert holder.net is net


def test_changed_children_only_the_folded_ones() -> None:
    holder = Holder()
    fused = fuse(holder.net)
    assert set(changed_children(holder.net, fused)) == {"0", "1"}  # the folded conv and the BatchNorm's Identity
    assert changed_children(holder.net, holder.net) == {}


def test_replacements_for_the_module_itself_must_keep_its_class() -> None:
    holder = Holder()
    with pytest.raises(ValueError, match="needs generated code for its own forward"):
        replacements(holder, Network(SELF, ""), torch.fx.symbolic_trace(nn.Linear(2, 2)))

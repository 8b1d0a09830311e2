"""batches: which part of a batch is the forward's input and which the target, and the checks before training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fx_lightning.lightning.batches import (
    InputBinding,
    check_signature,
    describe,
    keep_one_shot,
    leading_inputs,
)
from fx_lightning.lightning.networks import Network


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x) * mask


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_input_binding_defaults_take_first_and_second_elements() -> None:
    binding = InputBinding()
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert binding.bind(Plain(), [Network("net", "net")], (x, y)) == ""
    assert binding.leading is None
    assert binding.input_of((x, y)) is x
    assert binding.target_of((x, y)) is y
    assert binding.input_of({"image": x, "label": y}) is x


def test_input_binding_leading_elements_for_a_forward_of_several_inputs() -> None:
    binding = InputBinding()
    x, mask, y = torch.zeros(2, 3), torch.ones(2, 2), torch.tensor([0, 1])
    note = binding.bind(Masked(), [Network("net", "net")], (x, mask, y))
    assert binding.leading == 2
    assert note.startswith("input: elements 0-1 of each batch (a tuple of 3) passed to Masked.forward(x, mask)")
    assert "target: element 2" in note
    inputs = binding.input_of((x, mask, y))
    assert len(inputs) == 2
    assert inputs[0] is x
    assert inputs[1] is mask
    assert binding.target_of((x, mask, y)) is y
    assert binding.target_of((x, mask)) is None


def test_input_binding_user_functions_win() -> None:
    binding = InputBinding(get_input=lambda b: b["pixels"], get_target=lambda b: b["class"])
    batch = {"pixels": torch.zeros(2, 3), "class": torch.zeros(2)}
    assert binding.bind(Masked(), [Network("net", "net")], (1, 2, 3)) == ""
    assert binding.input_of(batch) is batch["pixels"]
    assert binding.target_of(batch) is batch["class"]


def test_leading_inputs_only_when_the_first_element_does_not_fit() -> None:
    def one(x: Any) -> None: ...

    def two(x: Any, mask: Any, scale: float = 1.0) -> None: ...

    assert leading_inputs(one, (1, 2, 3), with_target=True) is None
    assert leading_inputs(two, (1, 2, 3), with_target=True) == 2
    assert leading_inputs(two, (1, 2), with_target=True) is None  # no element left for the target
    assert leading_inputs(two, (1, 2), with_target=False) == 2
    assert leading_inputs(two, torch.zeros(3), with_target=True) is None


def test_check_signature_names_forward_the_batch_and_the_fix() -> None:
    module = Masked()
    check_signature(module.forward, (torch.zeros(1), torch.zeros(1)), "the first val batch")
    check_signature(module.forward, {"x": 1, "mask": 2}, "the first val batch")
    match = (
        r"FuseOnExport: Masked.forward\(x: 'torch.Tensor', mask: 'torch.Tensor'\) -> 'torch.Tensor' cannot take the "
        r"input from the first val batch \(a tuple of 2\): get_input returned Tensor, passed as one argument .*"
        r"Pass get_input=lambda batch: \.\.\."
    )
    with pytest.raises(TypeError, match=match):
        check_signature(module.forward, torch.zeros(1), "the first val batch (a tuple of 2)")


def test_describe_batches() -> None:
    assert describe(torch.zeros(2, 3)) == "a tensor of shape (2, 3)"
    assert describe([1, 2]) == "a list of 2"
    assert describe(3) == "int"


def test_keep_one_shot_reads_a_generator_once_up_to_the_cap() -> None:
    given = [1, 2, 3]
    assert keep_one_shot(given, 2) is given
    assert keep_one_shot(iter(given), 2) == [1, 2]
    assert keep_one_shot((b for b in given), None) == [1, 2, 3]

"""fx_lightning.trees: batch sizes, rows, devices and dtypes of pytrees of tensors, read one way everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fx_lightning.trees import (
    batch_size,
    floating_dtype,
    leading_size,
    leading_sizes,
    like_module,
    module_device,
    padded_rows,
    tensor_leaves,
    tree_to,
)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((torch.zeros(8, 3),), 8),
        ((torch.zeros(8, 3), {"mask": torch.ones(8)}, 0.5), 8),
        (([torch.zeros(3, 5, 5), torch.zeros(3, 7, 7)],), 2),  # a list of images: one sample per image
        ((torch.zeros(8, 3), torch.zeros(5)), None),  # the batched tensors disagree
        ((torch.tensor(1.0), 3), None),  # nothing batched
    ],
)
def test_batch_size_of_one_call(args: tuple, expected: int | None) -> None:
    assert batch_size(args) == expected


def test_leading_size_takes_the_first_batched_tensor() -> None:
    args = (torch.tensor(2.0), torch.zeros(8, 3), torch.zeros(5))
    assert leading_size(args) == 8
    assert leading_sizes(args) == {8, 5}
    assert leading_size((1, "a")) is None


def test_padded_rows_pads_with_the_last_row() -> None:
    t = torch.arange(10).reshape(5, 2)
    assert padded_rows(t, 0, 4).tolist() == t[:4].tolist()
    assert padded_rows(t, 4, 3).tolist() == [[8, 9], [8, 9], [8, 9]]
    assert padded_rows(3, 0, 4) == 3
    scalar = torch.tensor(1.0)
    assert padded_rows(scalar, 0, 4) is scalar


def test_tree_to_casts_floating_tensors_only() -> None:
    tree = {"x": torch.zeros(2, dtype=torch.float64), "y": [torch.ones(2, dtype=torch.long), "label"]}
    out = tree_to(tree, dtype=torch.float16)
    assert out["x"].dtype == torch.float16
    assert out["y"][0].dtype == torch.long
    assert out["y"][1] == "label"


def test_tree_to_returns_ready_inputs_as_they_are() -> None:
    args = (torch.zeros(2, 3), torch.ones(2, dtype=torch.long))
    assert tree_to(args, device="cpu", dtype=torch.float32, contiguous=True) is args
    transposed = (torch.zeros(3, 2).t(),)
    out = tree_to(transposed, device="cpu", contiguous=True)
    assert out is not transposed
    assert out[0].is_contiguous()


def test_like_module_follows_the_module_floating_dtype() -> None:
    net = nn.Linear(2, 2).to(torch.float64)
    x, labels = like_module((torch.zeros(1, 2), torch.ones(1, dtype=torch.long)), net)
    assert x.dtype == torch.float64
    assert labels.dtype == torch.long
    unchanged = (torch.zeros(1, 2),)
    assert like_module(unchanged, nn.ReLU()) is unchanged  # no floating parameter: nothing to follow
    assert like_module(unchanged, lambda x: x) is unchanged  # not a module


def test_floating_dtype_and_devices() -> None:
    assert floating_dtype((torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.bfloat16))) == torch.bfloat16
    assert floating_dtype((torch.ones(1, dtype=torch.long),)) is None
    assert module_device(nn.ReLU()) == torch.device("cpu")
    assert [tuple(t.shape) for t in tensor_leaves({"a": torch.zeros(2), "b": (1, torch.zeros(3, 1))})] == [(2,), (3, 1)]

"""Batches as pytrees: how many samples one call's inputs hold, their rows, and the same inputs on another device or
in another floating dtype.

A network's positional inputs are a pytree (tensors in tuples, lists and dicts); the helpers here read it the one
way the package reads it everywhere: the batch is the leading dimension of the tensors that have one, and a single
list of images (a whole detector's input) holds as many samples as images. At the bottom of the import graph (it
imports torch only), so that every layer can use it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tree's tensors, in leaf order (what runtimes that take flat lists of arrays are fed).

    Example:
        >>> [tuple(t.shape) for t in tensor_leaves((torch.zeros(2, 3), 4, {"mask": torch.ones(2)}))]
        [(2, 3), (2,)]
    """
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


def leading_sizes(tree: Any) -> set[int]:
    """The sizes of the leading dimension of the tree's tensors that have one.

    Example:
        >>> sorted(leading_sizes((torch.zeros(4, 3), {"mask": torch.zeros(4)}, torch.tensor(1.0))))
        [4]
    """
    return {t.shape[0] for t in tree_leaves(tree) if isinstance(t, Tensor) and t.dim() > 0}


def leading_size(tree: Any) -> int | None:
    """The leading size of the tree's first tensor that has a dimension (``None`` when none has).

    Example:
        >>> leading_size((torch.zeros(8, 3), torch.zeros(2))), leading_size((3, torch.tensor(1.0)))
        (8, None)
    """
    first = next((t for t in tree_leaves(tree) if isinstance(t, Tensor) and t.dim() > 0), None)
    return int(first.shape[0]) if first is not None else None


def batch_size(args: tuple[Any, ...]) -> int | None:
    """The number of samples in one call's positional inputs: the images of a single list of images (a whole
    detector's input), else the leading size all batched tensors share; ``None`` when they disagree or there is none.

    Example:
        >>> batch_size((torch.zeros(8, 3), torch.zeros(8))), batch_size(([torch.zeros(3, 4, 4)] * 2,))
        (8, 2)
        >>> batch_size((torch.zeros(8, 3), torch.zeros(5))) is None
        True
    """
    if len(args) == 1 and isinstance(args[0], (list, tuple)) and all(isinstance(t, Tensor) for t in args[0]):
        return len(args[0])
    sizes = leading_sizes(args)
    return sizes.pop() if len(sizes) == 1 else None


def floating_dtype(tree: Any) -> torch.dtype | None:
    """The dtype of the tree's first floating tensor (``None`` when it has none): the dtype an artifact was written in.

    Example:
        >>> floating_dtype((torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.float16)))
        torch.float16
    """
    return next((t.dtype for t in tree_leaves(tree) if isinstance(t, Tensor) and t.is_floating_point()), None)


def padded_rows(t: Any, start: int, size: int) -> Any:
    """Rows ``start:start + size`` of a batched tensor, padded with copies of its last row up to ``size`` (anything
    else as it is): the chunks an artifact of fixed batch size runs.

    Example:
        >>> padded_rows(torch.arange(5), 3, 4).tolist()
        [3, 4, 4, 4]
    """
    if not isinstance(t, Tensor) or t.dim() == 0:
        return t
    part = t[start : start + size]
    missing = size - part.shape[0]
    if missing > 0:
        part = torch.cat([part, part[-1:].expand(missing, *part.shape[1:])])
    return part


def tree_to(
    tree: Any, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None, contiguous: bool = False
) -> Any:
    """``tree`` with every tensor on ``device`` and every floating tensor in ``dtype`` (``None``: left as is), made
    contiguous when asked (as compiled runtimes expect).

    Example:
        >>> x, labels = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.long)
        >>> [t.dtype for t in tree_to((x, labels), dtype=torch.float32)]
        [torch.float32, torch.int64]
    """
    device = torch.device(device) if device is not None else None

    def to(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t.contiguous() if contiguous else t

    if isinstance(tree, tuple) and all(_ready(t, device, dtype, contiguous) for t in tree):
        return tree  # the common case of runtimes fed on every call, without the cost of a tree walk
    return tree_map(to, tree)


def _ready(t: Any, device: torch.device | None, dtype: torch.dtype | None, contiguous: bool) -> bool:
    return (
        isinstance(t, Tensor)
        and (device is None or t.device == device)
        and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
        and (not contiguous or t.is_contiguous())
    )


def floating_tensor(module: Any) -> Tensor | None:
    """The module's first floating parameter or buffer (``None`` for a module without one, or not a module)."""
    if not isinstance(module, nn.Module):
        return None
    return next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module without tensors)."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def like_module(tree: Any, module: Any) -> Any:
    """``tree`` as ``module`` takes it: floating tensors in its floating dtype, every tensor on its device (as it is
    when the module has no floating parameter or buffer).

    Example:
        >>> like_module((torch.zeros(2, dtype=torch.float64),), nn.Linear(2, 2))[0].dtype
        torch.float32
    """
    reference = floating_tensor(module)
    if reference is None:
        return tree
    return tree_to(tree, device=reference.device, dtype=reference.dtype)

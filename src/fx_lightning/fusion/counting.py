"""Count what a forward pass runs: ATen kernels by name (:func:`count_kernels`), and the BatchNorms it runs.

Two counts, because a BatchNorm need not run a ``batch_norm`` kernel: torchvision's ``FrozenBatchNorm2d``
normalises with a multiply and an add. :func:`count_batch_norms` is the one definition of "the BatchNorms a
forward runs" (``batch_norm`` kernels plus frozen BatchNorm calls); :func:`count_kernels` counts kernels and
nothing else, for any keyword.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fx_lightning.fusion.tracing import is_frozen_batch_norm


class _OpCounter(TorchDispatchMode):
    def __init__(self, keyword: str) -> None:
        super().__init__()
        self.keyword = keyword
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if self.keyword in name:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any], keyword: str = "") -> int:
    """Call ``fn()`` and count the ATen kernels it dispatches whose name contains ``keyword`` (all when empty).

    Call it under ``torch.inference_mode()`` to count what inference runs (outside it, autograd adds ops).
    """
    with _OpCounter(keyword) as counter:
        fn()
    return sum(counter.counts.values())


@contextmanager
def counting_ops(keyword: str = "") -> Iterator[Counter[str]]:
    """Count the ATen kernels dispatched inside the block whose name contains ``keyword``, by kernel name: for code
    that is not one call, e.g. between a Lightning loop's batch-start and batch-end hooks.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
        >>> with torch.no_grad(), counting_ops("batch_norm") as counts:
        ...     _ = net(torch.randn(1, 1, 4, 4))
        >>> sum(counts.values())
        1
    """
    with _OpCounter(keyword) as counter:
        yield counter.counts


def count_kernels(model: nn.Module, *inputs: Any, keyword: str = "batch_norm") -> int:
    """Run ``model(*inputs)`` without gradients and count the ATen kernels whose name contains ``keyword``.

    The dispatcher sees every BatchNorm kernel however it was called (``nn.BatchNorm2d``, ``F.batch_norm`` in a
    subclass, ``torch.batch_norm``), so this counts what runs, not the modules present. A BatchNorm that runs
    no ``batch_norm`` kernel (torchvision's ``FrozenBatchNorm2d``) is not counted: :func:`count_batch_norms`
    counts the BatchNorms a forward runs, whatever computes them.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
        >>> count_kernels(net, torch.randn(1, 1, 4, 4))
        1
    """
    with torch.no_grad():
        return count_ops(lambda: model(*inputs), keyword)


def count_batch_norms(run: Callable[[], Any], root: nn.Module) -> int:
    """Call ``run()`` without gradients and count the BatchNorms it runs: ATen ``batch_norm`` kernels, plus calls
    of frozen BatchNorm modules inside ``root`` (torchvision's ``FrozenBatchNorm2d`` computes with a multiply and
    an add, so no ``batch_norm`` kernel shows it).

    Example:
        >>> from torchvision.ops import FrozenBatchNorm2d
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), FrozenBatchNorm2d(2), nn.BatchNorm2d(2)).eval()
        >>> count_batch_norms(lambda: net(torch.zeros(1, 1, 4, 4)), net)
        2
    """
    frozen = [m for m in root.modules() if is_frozen_batch_norm(m)]
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handles = [m.register_forward_hook(hook) for m in frozen]
    try:
        with torch.no_grad():
            kernels = count_ops(run, "batch_norm")
    finally:
        for handle in handles:
            handle.remove()
    return kernels + calls

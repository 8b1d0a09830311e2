"""Running a network once to learn about it: the inputs each sub-network receives, the BatchNorms it runs.

Nothing here imports Lightning; :class:`~fx_lightning.FuseOnExport` uses it on the LightningModule's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fx_lightning.fusion.counting import count_ops
from fx_lightning.fusion.tracing import is_frozen_batch_norm


@dataclass
class Call:
    """The arguments one call of a module received."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def capture_calls(run: Callable[[], Any], modules: dict[str, nn.Module]) -> dict[str, Call]:
    """Call ``run()`` and record the arguments of the first call of each module in ``modules``.

    Modules ``run`` never calls are absent from the result.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> calls = capture_calls(lambda: net(torch.zeros(1, 2)), {"head": net[1]})
        >>> tuple(calls["head"].args[0].shape)
        (1, 3)
    """
    captured: dict[str, Call] = {}
    handles = []
    for name, module in modules.items():

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            captured.setdefault(name, Call(tuple(args), dict(kwargs)))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


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

"""Running a network once to learn about it: the inputs each sub-network receives.

Nothing here imports Lightning; :class:`~fx_lightning.FuseOnExport` uses it on the LightningModule's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class Call:
    """The arguments one call of a module received."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def capture_calls(run: Callable[[], Any], modules: dict[str, nn.Module]) -> dict[str, Call]:
    """Call ``run()`` and record the arguments of the first call of each module in ``modules``.

    Modules ``run`` never calls are absent from the result.

    Example:
        >>> import torch
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

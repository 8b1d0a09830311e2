"""Helpers for tests and demos: give BatchNorm layers statistics that make folding matter."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every BatchNorm's running statistics and affine parameters with random values, in place.

    Freshly built models have mean 0, var 1, weight 1, bias 0, so a wrong fold would go unnoticed.

    Returns:
        ``model``, for chaining.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        for name in ("running_mean", "bias"):
            t = getattr(module, name)
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        for name in ("running_var", "weight"):
            t = getattr(module, name)
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
    return model

"""The tests' one measure of numerical agreement.

The tests check the package's own comparison (``fx_lightning.verify.compare``), so they measure with this
independent one: ``max |out - ref| / max |ref|`` in float64.
"""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``, computed in float64; the absolute difference when ``ref`` is all zero.

    Example:
        >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    ref64 = ref.detach().to(torch.float64)
    diff = (out.detach().to(torch.float64) - ref64).abs().max()
    scale = ref64.abs().max()
    return (diff / scale).item() if scale > 0 else diff.item()

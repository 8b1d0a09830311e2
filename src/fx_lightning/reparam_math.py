"""The re-parameterisation maths under the names the passes import; it lives in :mod:`fx_lightning.folding`.

``cast_weight`` is :func:`~fx_lightning.folding.cast_like`.
"""

from __future__ import annotations

from fx_lightning.folding import (
    all_finite,
    average_kernel,
    cast_like,
    centred_kernel,
    constant_affine,
    fold_affine_after_layer,
    identity_kernel,
    pool_divisor,
    scale_output_channels,
    sum_branches,
)

cast_weight = cast_like

__all__ = [
    "all_finite",
    "average_kernel",
    "cast_like",
    "cast_weight",
    "centred_kernel",
    "constant_affine",
    "fold_affine_after_layer",
    "identity_kernel",
    "pool_divisor",
    "scale_output_channels",
    "sum_branches",
]

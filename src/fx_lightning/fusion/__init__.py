"""Fusion: an ``nn.Module`` in, the fused ``nn.Module`` and its report out. Never imports Lightning.

``api`` holds :func:`fuse` and its argument checks, ``engine`` the tracing and the write-back, ``passes/`` the
rewrites and the manager that runs them, ``maths`` the folding formulas, ``report`` what was folded, left and why,
``checkpoint_form`` the fused weights as a state dict.
"""

from fx_lightning.fusion.api import fuse

__all__ = ["fuse"]

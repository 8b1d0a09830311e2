"""Fusion: an ``nn.Module`` in, the fused ``nn.Module`` and its report out. Never imports Lightning.

``engine`` holds :func:`fuse` (tracing, the passes, the self-check), ``passes/`` the rewrites, ``maths`` the
folding formulas, ``report`` what was folded, left and why, ``checkpoint_form`` the fused weights as a state dict.
"""

from fx_lightning.fusion.engine import fuse

__all__ = ["fuse"]

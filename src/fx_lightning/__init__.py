"""fx_lightning: exact BatchNorm folding with torch.fx, verified and exported from PyTorch Lightning."""

from fx_lightning.counting import count_kernels
from fx_lightning.passes import register_pass, registered_passes
from fx_lightning.pipeline import fuse
from fx_lightning.report import Folded, FusionReport, Removed, Skipped, Untraced

__all__ = [
    "Folded",
    "FusionReport",
    "Removed",
    "Skipped",
    "Untraced",
    "count_kernels",
    "fuse",
    "register_pass",
    "registered_passes",
]

"""fx_lightning: exact BatchNorm folding with torch.fx, verified and exported from PyTorch Lightning."""

from fx_lightning.checkpoint import CheckpointFold, checkpoint_plan, checkpoint_state_dict
from fx_lightning.counting import count_kernels
from fx_lightning.passes import register_pass, registered_passes
from fx_lightning.pipeline import fuse
from fx_lightning.report import Folded, FusionReport, Merged, Removed, Skipped, Untraced

__all__ = [
    "CheckpointFold",
    "Folded",
    "FuseOnExport",
    "FusionReport",
    "Merged",
    "Removed",
    "Skipped",
    "Untraced",
    "checkpoint_plan",
    "checkpoint_state_dict",
    "count_kernels",
    "fuse",
    "register_pass",
    "registered_passes",
]


def __getattr__(name: str) -> object:
    # The callback imports Lightning; load it on first use so `import fx_lightning` stays cheap.
    if name == "FuseOnExport":
        from fx_lightning.callback import FuseOnExport

        return FuseOnExport
    raise AttributeError(f"module 'fx_lightning' has no attribute {name!r}")

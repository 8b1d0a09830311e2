"""fx_lightning: exact BatchNorm folding with torch.fx, verified and exported from PyTorch Lightning.

The rooms: ``fusion`` (``fuse`` and its passes), ``verify`` (comparison and the task metric), ``deploy`` (artifacts
checked in their runtimes), ``lightning`` (``FuseOnExport``, the CLI), ``examples`` (the digits data and models).
"""

from fx_lightning import _aliases
from fx_lightning.fusion.api import fuse
from fx_lightning.fusion.checkpoint_form import CheckpointFold, checkpoint_plan, checkpoint_state_dict
from fx_lightning.fusion.counting import count_kernels
from fx_lightning.fusion.passes import register_pass, registered_passes
from fx_lightning.fusion.report import Folded, FusionReport, Merged, Removed, Skipped, Untraced

_aliases.install()

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
    "export_and_verify",
    "fuse",
    "register_pass",
    "registered_passes",
]

# Loaded on first use so that `import fx_lightning` stays cheap: the callback imports Lightning, the deploy flow
# the runtimes' registry.
_LAZY = {
    "FuseOnExport": "fx_lightning.lightning.callback",
    "export_and_verify": "fx_lightning.deploy.flow",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fx_lightning' has no attribute {name!r}")

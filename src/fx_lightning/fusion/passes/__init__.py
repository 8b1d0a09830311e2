"""Graph rewrites, one per file, each a function ``(GraphModule) -> PassChanges``, run in registry order.

Adding a rule means adding one file and one :func:`register_pass` call; :func:`fx_lightning.fuse`
runs whatever is registered, in order, unless told to run a subset, through the pass manager
(:func:`~fx_lightning.fusion.passes.manager.run_passes`).
"""

from __future__ import annotations

from fx_lightning.fusion.passes.fold_bn_into_following import fold_bn_into_following
from fx_lightning.fusion.passes.fold_bn_into_preceding import fold_bn_into_preceding
from fx_lightning.fusion.passes.fold_constant_scale import fold_constant_scale
from fx_lightning.fusion.passes.manager import GraphPass, PassError, PassRun, run_passes
from fx_lightning.fusion.passes.merge_branches import merge_branches
from fx_lightning.fusion.passes.remove_dropout import remove_dropout
from fx_lightning.fusion.passes.rewriting import PassChanges, Rewrite
from fx_lightning.registry import Registry

PASSES: Registry[GraphPass] = Registry("pass", "register_pass")


def register_pass(name: str, fn: GraphPass) -> GraphPass:
    """Add ``fn`` to the passes :func:`fx_lightning.fuse` runs, after those already registered.

    Raises:
        ValueError: if ``name`` is already registered.
    """
    return PASSES.register(name, fn)


def registered_passes() -> dict[str, GraphPass]:
    """The registered passes, by name, in the order they run."""
    return PASSES.as_dict()


register_pass("remove_dropout", remove_dropout)
register_pass("fold_bn_into_preceding", fold_bn_into_preceding)
register_pass("fold_bn_into_following", fold_bn_into_following)
# After BatchNorm folding, so that branch convolutions carry their BN; fuse() repeats the passes until
# none applies, so a merged conv followed by a BN or a constant scale is folded in the next round.
register_pass("merge_branches", merge_branches)
register_pass("fold_constant_scale", fold_constant_scale)

__all__ = [
    "PASSES",
    "GraphPass",
    "PassChanges",
    "PassError",
    "PassRun",
    "Rewrite",
    "register_pass",
    "registered_passes",
    "run_passes",
]

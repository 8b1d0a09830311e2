"""Every place where :class:`~fx_lightning.FuseOnExport` relies on Lightning (or torch) beyond their public API.

Checked against ``lightning`` 2.6 and ``pytorch_lightning`` 2.6 (both namespaces: the Trainer objects of the two
packages have the same internals) and torch 2.14 for ``torch.compile``'s wrapper. Where a public API exists it is
used (``is_overridden``, ``trainer.limit_val_batches``, ``trainer.callbacks``); each private access below says why
the public one does not do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

_LOOPS = {
    "val": lambda trainer: trainer.fit_loop.epoch_loop.val_loop,
    "validate": lambda trainer: trainer.validate_loop,
    "test": lambda trainer: trainer.test_loop,
    "predict": lambda trainer: trainer.predict_loop,
}
_LIMITS = {"val": "limit_val_batches", "validate": "limit_val_batches", "test": "limit_test_batches"}
_LIMITS["predict"] = "limit_predict_batches"
_SPAWN_LAUNCHERS = ("_MultiProcessingLauncher",)
#: The methods ``lightning.pytorch.utilities.compile.from_compiled`` replaces by compiled ones on the instance.
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def unsharded_dataloaders(trainer: Any, loop: str) -> Any:
    """The dataloader(s) a loop (``"val"``, ``"validate"``, ``"test"``, ``"predict"``) would load, as the user gave
    them, or ``None`` when the loop has no data.

    Private: ``loop._data_source``. The public ``trainer.val_dataloaders`` holds only what a loop already loaded,
    with a ``DistributedSampler`` that pads each rank's share with repeated samples; the callback partitions the
    unsharded data itself so that a synchronised metric equals the single-process one.
    """
    source = getattr(_LOOPS[loop](trainer), "_data_source", None)
    if source is None or not source.is_defined():
        return None
    try:
        return source.dataloader()
    except Exception:  # noqa: BLE001 - e.g. a datamodule that builds the val split only for "fit": no data here
        return None


def training_dataloader(trainer: Any) -> Any:
    """The training dataloader(s) of the Trainer's ``fit`` (public ``trainer.train_dataloader`` once fit loaded it;
    before that, the fit loop's source), or ``None`` when the Trainer has no training data (a ``test`` alone).

    Private: ``fit_loop._data_source``, only when the public property is not set yet.
    """
    loaders = trainer.train_dataloader
    if loaders is not None:
        return loaders
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    try:
        return source.dataloader()
    except Exception:  # noqa: BLE001 - a datamodule that builds its training split only for "fit": no data here
        return None


def batch_limit(trainer: Any, loop: str, length: int | None) -> int | None:
    """How many batches of a loader of ``length`` batches the Trainer's ``limit_<loop>_batches`` allows
    (``None``: no limit known). The same rule as Lightning's: an int caps, a float is a fraction of the length."""
    limit = getattr(trainer, _LIMITS.get(loop, ""), None)
    if limit is None or isinstance(limit, bool):
        return None
    if isinstance(limit, int):
        return limit if length is None else min(limit, length)
    if length is None:
        return None
    return int(length * float(limit))


def before_batch_transfer(pl_module: Any, batch: Any) -> Any:
    """Run the LightningModule's ``on_before_batch_transfer`` as Lightning's loops do.

    Private: ``LightningModule._on_before_batch_transfer`` routes the hook through the Trainer (profiling, the
    datamodule's own hook); calling ``on_before_batch_transfer`` directly would skip the datamodule's.
    """
    hook = getattr(pl_module, "_on_before_batch_transfer", None)
    if hook is None:
        return pl_module.on_before_batch_transfer(batch, 0)
    return hook(batch, dataloader_idx=0)


def overrides_forward(pl_module: Any) -> bool:
    """Whether the LightningModule's class defines its own ``forward`` (public ``is_overridden``)."""
    parent = next(
        (
            cls
            for cls in type(pl_module).__mro__
            if cls.__name__ == "LightningModule" and cls.__module__.startswith(("lightning.", "pytorch_lightning."))
        ),
        None,
    )
    if parent is None:
        return type(pl_module).forward is not nn.Module.forward
    return is_overridden("forward", pl_module, parent=parent)


def unsupported_strategy(trainer: Any) -> str:
    """Why the Trainer's strategy cannot work with fused networks, or ``""``.

    Private: the launcher's class name and ``_start_method``; no public API says whether a strategy spawns.
    """
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    sharded = names.intersection(_SHARDED_STRATEGIES)
    if sharded:
        return (
            f"FuseOnExport does not support Trainer(strategy={type(strategy).__name__}) yet: sharded parameters "
            "cannot be folded in place. Train with strategy='ddp' (or a single device), or fuse the saved "
            "checkpoint afterwards with fx_lightning.fuse."
        )
    launcher = getattr(strategy, "launcher", None)
    if launcher is not None and {cls.__name__ for cls in type(launcher).__mro__}.intersection(_SPAWN_LAUNCHERS):
        return (
            f"FuseOnExport does not support spawn-based strategies (Trainer(strategy={type(strategy).__name__}) "
            f"with start method {getattr(launcher, '_start_method', '?')!r}): the main process reloads the workers' "
            "weights with strict=False, which would silently drop the fused weights. Use strategy='ddp' from a "
            "script (each process runs the script), or a single device."
        )
    return ""


def weights_checkpoint(trainer: Any) -> dict[str, Any]:
    """The checkpoint ``trainer.save_checkpoint(path, weights_only=True)`` would write, as a dict.

    Private: ``trainer._checkpoint_connector.dump_checkpoint``. ``save_checkpoint`` writes straight to a file and
    is a collective; the deploy checkpoint needs the dict (hyper-parameters, versions, loops) to put the folded
    values in, on one rank.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=True)


def compiled_module(module: nn.Module) -> nn.Module | None:
    """The module behind ``torch.compile`` (``OptimizedModule._orig_mod``), or ``None`` if ``module`` is not
    compiled."""
    inner = getattr(module, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(module).__name__ == "OptimizedModule":
        return inner
    return None


def is_compiled_lightning_module(pl_module: Any) -> bool:
    """Whether the LightningModule runs compiled: the Trainer was given ``torch.compile(pl_module)`` (Lightning then
    runs its ``forward`` and steps compiled, ``from_compiled``, and records it in ``pl_module._compiler_ctx``), or
    it was compiled in place with ``pl_module.compile()``.

    Private: ``_compiler_ctx`` and torch's ``nn.Module._compiled_call_impl``; no public API says whether a module
    runs compiled.
    """
    return isinstance(getattr(pl_module, "_compiler_ctx", None), dict) or _compiled_in_place(pl_module)


def _compiled_in_place(module: Any) -> bool:
    return module.__dict__.get("_compiled_call_impl") is not None


@contextmanager
def uncompiled(pl_module: Any) -> Iterator[bool]:
    """Inside, a LightningModule the Trainer runs compiled has its own (uncompiled) ``forward`` and steps; they are
    put back on exit. Yields whether it was compiled.

    Compiled code runs the forward hooks and modules it was compiled with (dynamo does not guard on hooks added
    later), so the hooks that capture the networks' inputs, the verification and the copies that fusion makes
    must see the class's own methods. Private: the instance attributes and ``_compiler_ctx`` that
    ``from_compiled`` sets (as ``lightning.pytorch.utilities.compile.to_uncompiled`` undoes them, but reversibly),
    and torch's ``_compiled_call_impl`` that ``nn.Module.compile()`` sets.
    """
    if not is_compiled_lightning_module(pl_module):
        yield False
        return
    context = getattr(pl_module, "_compiler_ctx", None)
    names = _COMPILED_METHODS if isinstance(context, dict) else ()
    saved = {name: pl_module.__dict__.pop(name) for name in names if name in pl_module.__dict__}
    in_place = pl_module.__dict__.pop("_compiled_call_impl", None)
    pl_module._compiler_ctx = None
    try:
        yield True
    finally:
        pl_module.__dict__.update(saved)
        pl_module._compiler_ctx = context
        if in_place is not None:
            pl_module.__dict__["_compiled_call_impl"] = in_place


def recompile(compiled: nn.Module, module: nn.Module) -> nn.Module:
    """``module`` compiled the way ``compiled`` was (same backend, mode and options).

    Private: ``OptimizedModule(mod, dynamo_ctx)``; ``torch.compile`` does not expose the options it was given.
    """
    return type(compiled)(module, compiled.dynamo_ctx)


def move_to_end(trainer: Any, callback: Any) -> bool:
    """Put ``callback`` last in ``trainer.callbacks``, so that its ``on_train_end`` runs after every other
    callback's (weight averaging, pruning) and sees the weights the user gets. Returns whether it moved.

    ``trainer.callbacks`` is public, but Lightning orders it once at construction (checkpoint callbacks last)
    and calls hooks while iterating over it: a new list is assigned, never the one being iterated changed.
    """
    callbacks = list(trainer.callbacks)
    if not callbacks or callbacks[-1] is callback or callback not in callbacks:
        return False
    callbacks.remove(callback)
    trainer.callbacks = [*callbacks, callback]
    return True

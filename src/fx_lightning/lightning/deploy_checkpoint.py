"""The deploy checkpoint: a Lightning checkpoint of the user's own class holding the fused networks' values.

:func:`write_deploy_checkpoint` takes the checkpoint ``trainer.save_checkpoint(weights_only=True)`` would write,
replaces each fused network's values by :func:`fx_lightning.deploy.export.checkpoint_state_dict` (the original layout,
folded values where they can be written), saves it, reloads it strictly with the user's class
(``type(pl_module).load_from_checkpoint``, or a strict ``load_state_dict`` into a fresh copy of the module when
the class cannot be rebuilt from its hyper-parameters), and compares the reloaded networks' outputs with the fused
ones' on their captured inputs (:func:`~fx_lightning.verify.compare_trees`: relative to each output's scale; outputs
that vary in shape, detections after NMS, are listed and left to the task metric). A mismatch is reported in
:attr:`DeployCheckpoint.error`, never raised: the checkpoint is one artifact among others, with its own verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fx_lightning.deploy.export import checkpoint_state_dict
from fx_lightning.errors import first_line
from fx_lightning.fusion.probe import Call
from fx_lightning.lightning import compat
from fx_lightning.lightning.networks import Network, pruned_tensors, without_pruning
from fx_lightning.trees import module_device
from fx_lightning.verify.compare import compare_trees
from fx_lightning.verify.verifier import eval_mode

CHECKPOINT_FILE = "deploy.ckpt"


@dataclass
class DeployCheckpoint:
    """Where the deploy checkpoint went and how it was checked.

    Attributes:
        path: the file.
        loaded_with: ``"load_from_checkpoint"`` or ``"load_state_dict"`` (a fresh copy of the module).
        max_abs_diff: the largest difference between the reloaded and the fused networks' outputs (over the output
            leaves of the same shape).
        notes: anything the user should know (why ``load_from_checkpoint`` could not be used, outputs that vary
            in shape and were left to the task metric).
        module: the LightningModule reloaded from the file (on the module's device), so that the caller can check
            it further, e.g. over the verification data with :func:`fx_lightning.deploy.check.verify_artifacts`.
        max_rel_diff: the same difference relative to each output's scale.
        error: why the reloaded networks cannot stand for the fused ones (outputs of another structure), or ``""``.
        mismatch: where their outputs differ on the captured inputs beyond ``rtol``, or ``""``: a verdict only where
            nothing else checks the checkpoint; post-processed outputs (detections) differ by rounding amplified
            through NMS, and the task metric over the verification data judges those.
    """

    path: Path
    loaded_with: str
    max_abs_diff: float
    notes: list[str] = field(default_factory=list)
    module: nn.Module | None = field(default=None, repr=False)
    max_rel_diff: float = 0.0
    error: str = ""
    mismatch: str = ""


def deploy_state_dict(
    pl_module: nn.Module, state: Mapping[str, torch.Tensor], fused: Mapping[Network, nn.Module]
) -> dict[str, torch.Tensor]:
    """``state`` (the LightningModule's state dict) with each fused network's values in the original layout.

    Raises:
        RuntimeError: if a fused network's keys are not in ``state``.
    """
    out = dict(state)
    for network, module in fused.items():
        prefix = network.state_prefix(pl_module)
        original = network.module(pl_module)
        values = checkpoint_state_dict(without_pruning(original), module)
        for path, name in pruned_tensors(original):
            # A pruned tensor is stored as <name>_orig and <name>_mask, its value being their product. A folded
            # layer's weight is zero wherever its mask is; a folded BatchNorm's identity values are not, so the
            # mask opens where the value is not zero: the product is the value exactly.
            key = f"{path}.{name}" if path else name
            value = values.pop(key)
            mask = out[f"{prefix}{key}_mask"]
            values[f"{key}_orig"] = value
            values[f"{key}_mask"] = torch.where(value != 0, torch.ones_like(mask), mask)
        missing = [prefix + k for k in values if prefix + k not in out]
        if missing:
            raise RuntimeError(
                f"the LightningModule's state dict has no key {missing[0]!r} of network '{network.name}'; "
                "the deploy checkpoint cannot be written in the original layout"
            )
        for key, value in values.items():
            out[prefix + key] = value.to(device=out[prefix + key].device)
    return out


def write_deploy_checkpoint(
    trainer: Any,
    pl_module: nn.Module,
    fused: Mapping[Network, nn.Module],
    inputs: Mapping[Network, Call],
    directory: Path,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> DeployCheckpoint:
    """Write, reload and check the deploy checkpoint of ``fused`` (on one process; the user's networks in place).

    Raises:
        RuntimeError: if the reloaded checkpoint does not load strictly (a mismatch of its outputs is reported in
            :attr:`DeployCheckpoint.error`).
    """
    checkpoint = compat.weights_checkpoint(trainer)
    checkpoint["state_dict"] = deploy_state_dict(pl_module, checkpoint["state_dict"], fused)
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)

    reloaded, loaded_with, notes = _reload(pl_module, path)
    reloaded.to(module_device(pl_module))
    result = DeployCheckpoint(path, loaded_with, 0.0, notes, reloaded)
    errors, mismatches = [], []
    for network, module in fused.items():
        call = inputs.get(network)
        if call is None:
            continue
        target = reloaded if network.is_self else network.module(reloaded)
        with torch.no_grad(), eval_mode(target), eval_mode(module):
            got = target(*call.args, **call.kwargs)
            want = module(*call.args, **call.kwargs)
        comparison = compare_trees(want, got, rtol=rtol, atol=atol)
        result.max_abs_diff = max(result.max_abs_diff, comparison.max_abs)
        result.max_rel_diff = max(result.max_rel_diff, comparison.max_rel)
        if comparison.structure:
            errors.append(f"the reloaded '{network.name}' gives outputs of another structure: {comparison.structure}")
            continue
        if not comparison.passed:
            mismatches.append(
                f"the reloaded '{network.name}' differs from the fused network on its example input: "
                f"{comparison.describe()} (rtol={rtol:g} relative to each output's largest value)"
            )
    result.error, result.mismatch = "; ".join(errors), "; ".join(mismatches)
    return result


def _reload(pl_module: nn.Module, path: Path) -> tuple[nn.Module, str, list[str]]:
    cls = type(pl_module)
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", strict=True), "load_from_checkpoint", []
    except Exception as first:  # noqa: BLE001 - e.g. __init__ arguments not saved with save_hyperparameters()
        first_error = first
        reason = f"{type(first).__name__}: {first_line(first)}"
    fresh = fresh_copy(pl_module)
    # our own file, just written; hyper-parameters may hold any object, so not weights_only
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    try:
        fresh.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"the deploy checkpoint {path} does not load strictly into {cls.__name__}: {first_line(err)}"
        ) from err
    note = (
        f"{cls.__name__}.load_from_checkpoint could not load the deploy checkpoint ({reason}); its state dict loads "
        "strictly into a copy of the module as it is now"
    )
    if isinstance(first_error, TypeError):  # the constructor's arguments
        note += ". Call self.save_hyperparameters() in __init__ to make load_from_checkpoint work"
    elif pruned_tensors(pl_module):
        note += " (pruned tensors are stored as <name>_orig and <name>_mask, as in your own checkpoints)"
    return fresh, "load_state_dict", [note]


def fresh_copy(pl_module: nn.Module) -> nn.Module:
    """A deep copy of the LightningModule without its Trainer (which is not copied, nor shared)."""
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        owner = pl_module.__dict__.get(attr)
        if owner is not None:
            memo[id(owner)] = None
    return copy.deepcopy(pl_module, memo)

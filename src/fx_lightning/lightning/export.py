"""The artifacts of one fusion, as FuseOnExport writes them: :func:`fx_lightning.deploy.flow.export_and_verify` per
network, fed what only the Lightning layer knows.

That is: the batches the fused network was verified on (on the device, with the same metric and input binding), the
LightningModule's forward with an artifact in the network's place when the network's own output is not what the
metric scores (a ``ModelOutput``, a backbone's features), the deploy checkpoint reloaded as an extra artifact, and
the training batches int8 calibrates on. Global rank zero writes; every process gets the outcome.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torchmetrics import Metric, MetricCollection

from fx_lightning.deploy.export import Artifact
from fx_lightning.deploy.flow import DeployReport, export_and_verify
from fx_lightning.deploy.int8.options import Int8Options
from fx_lightning.fusion.probe import Call
from fx_lightning.lightning import compat
from fx_lightning.lightning.batches import OnDevice, calibration_batches, to_device
from fx_lightning.lightning.deploy_checkpoint import CHECKPOINT_FILE, DeployCheckpoint, write_deploy_checkpoint
from fx_lightning.lightning.fusing import Run
from fx_lightning.lightning.networks import Network, Swap
from fx_lightning.lightning.options import CHECKPOINT_FORMAT, FuseOptions
from fx_lightning.lightning.summary import info, trainer_fn
from fx_lightning.loaders import read_batches
from fx_lightning.trees import leading_sizes
from fx_lightning.verify.verifier import eval_mode


def export(run: Run, options: FuseOptions, directory: Path) -> None:
    """Write and check the artifacts on global rank zero (the user's networks in place) and share the outcome with
    every process: the announced paths, the deploy report and table, the notes, the time, the error."""
    trainer, result = run.trainer, run.result
    status: dict[str, Any] = {"artifacts": {}, "deploy": {}, "table": "", "error": "", "seconds": 0.0, "notes": []}
    if trainer.is_global_zero:
        start = time.perf_counter()
        try:
            _write_and_check(run, options, directory, status)
        except Exception as err:  # noqa: BLE001 - reported like any failure after training
            status["error"] = f"export failed: {type(err).__name__}: {err}"
        status["seconds"] = time.perf_counter() - start
    status = trainer.strategy.broadcast(status, src=0)
    result.artifacts = status["artifacts"]
    result.deploy = status["deploy"]
    result.deploy_table = status["table"]
    result.notes += status["notes"]
    result.seconds["export"] = status["seconds"]
    if status["error"]:
        result.error = status["error"]


def exports_unfolded(run: Run, options: FuseOptions) -> bool:
    """Whether artifacts were asked for and some network, with nothing folded, can be exported as it is."""
    return bool(run.unfolded) and bool(options.export_formats) and run.result.error == ""


def _write_and_check(run: Run, options: FuseOptions, directory: Path, status: dict[str, Any]) -> None:
    """Every fused network's artifacts and the deploy checkpoint, each checked in the runtime that runs it over the
    data the fused network was verified on, and timed; fills ``status``."""
    directory.mkdir(parents=True, exist_ok=True)
    formats = options.written_formats()  # an int8 artifact is made from (and compared with) its float one
    networks = run.fused or run.unfolded  # nothing folded: the networks as they are, verified the same way
    if not run.fused:
        status["notes"].append(
            f"nothing was folded in {[n.name for n in networks]} (see the notes above): the artifacts asked for "
            "are the networks as they are, verified the same way"
        )
    checkpoint: DeployCheckpoint | None = None
    checkpoint_error = ""
    if CHECKPOINT_FORMAT in (options.export_formats or ()):
        try:
            checkpoint = write_deploy_checkpoint(run.trainer, run.pl_module, networks, run.calls, directory)
            status["notes"] += checkpoint.notes
        except Exception as err:  # noqa: BLE001 - the checkpoint fails alone; the other artifacts go on
            checkpoint_error = f"it could not be made: {type(err).__name__}: {err}"
    several = len(networks) > 1
    reports: dict[str, DeployReport] = {}
    for network, module in networks.items():
        call = run.calls.get(network)
        if call is None or call.kwargs:
            if not formats:
                continue  # the deploy checkpoint alone, checked on reload by write_deploy_checkpoint
            if call is None:
                raise RuntimeError(
                    f"no example input reached '{network.name}'; give FuseOnExport(example_input=...) or no "
                    "export_formats"
                )
            raise RuntimeError(
                f"'{network.name}' is called with keyword arguments {sorted(call.kwargs)}; the exporters take "
                "positional inputs only. Choose export_formats=['ckpt'] or wrap the network"
            )
        if not formats and checkpoint is None and not checkpoint_error:
            continue
        dynamic, why_not = dynamic_batch(options.dynamic_batch, call.args)
        if why_not:
            status["notes"].append(f"'{network.name}' exported with fixed input shapes: {why_not}")
        data = _artifact_data(run, options, network, call, status["notes"])
        int8, calibration = _int8_inputs(run, options, network, data, status["notes"]) if formats else (None, None)
        extra: dict[str, Artifact] = {}
        if checkpoint is not None:
            extra[CHECKPOINT_FORMAT] = checkpoint_artifact(run.pl_module, network, checkpoint)
        elif checkpoint_error:
            extra[CHECKPOINT_FORMAT] = Artifact(
                CHECKPOINT_FORMAT, directory / CHECKPOINT_FILE, runtime="load_from_checkpoint", error=checkpoint_error
            )
        batches = data.pop("batches")
        with eval_mode(run.pl_module):
            reports[network.name] = export_and_verify(
                network.module(run.pl_module),
                module,
                call.args,
                directory,
                batches,
                formats,
                name=network.file_stem(),
                dynamic_batch=dynamic,
                options={f: o for f, o in (options.export_options or {}).items() if f in formats},
                int8=int8,
                calibration=calibration,
                artifacts=extra,
                keep_going=True,  # int8 is opt-in: its failure fails the int8 artifacts, not the export
                tolerance=options.tolerance,
                latency_budget_s=options.deploy_latency_budget,
                strict=options.strict,
                **data,
            )
    announced: dict[str, str] = {}
    for name, report in reports.items():
        prefix = f"{name}." if several else ""
        for fmt, path in report.announced().items():
            if fmt != CHECKPOINT_FORMAT:
                announced[prefix + fmt] = str(path)
    checked = [r.artifacts[CHECKPOINT_FORMAT] for r in reports.values() if CHECKPOINT_FORMAT in r.artifacts]
    # a checkpoint no network's verification covered (networks called with keywords) stands on its reload check
    unchecked = checkpoint is not None and not checked and (checkpoint.error or checkpoint.mismatch)
    if unchecked and checkpoint is not None:
        status["notes"].append(f"the deploy checkpoint is not announced: {checkpoint.error or checkpoint.mismatch}")
    if checkpoint is not None and all(a.passed for a in checked) and not unchecked:
        announced[CHECKPOINT_FORMAT] = str(checkpoint.path)
    status["artifacts"] = announced
    status["deploy"] = deploy_data(reports, several)
    status["table"] = "\n".join((f"{name}: " if several else "") + report.table() for name, report in reports.items())


def _artifact_data(run: Run, options: FuseOptions, network: Network, call: Call, notes: list[str]) -> dict[str, Any]:
    """What the artifacts are checked on (:func:`~fx_lightning.deploy.flow.verify_artifacts`'s data arguments): the
    batches the fused network was verified on, with the same metric, re-iterable; the example input alone,
    outputs compared, when the network does not take the batch's input (or nothing was verified)."""
    trainer, pl_module = run.trainer, run.pl_module
    original = network.module(pl_module)
    takes_batch = run.batches is not None and run.first is not None and options.verify
    why = ""
    if takes_batch and not takes_example(call, run.example):
        why = f"the network does not take {type(pl_module).__name__}.forward's input"
    elif takes_batch and not _gives_forward_layout(run, original, call):
        # A ModelOutput, or a backbone's features: the forward maps them to what the metric scores.
        why = f"its output is not laid out as {type(pl_module).__name__}.forward's"
    through = None
    if why and not network.is_self and _runs_once(run, network):
        through = _through(run, network)
        notes.append(
            f"'{network.name}' artifacts verified with the metric through {type(pl_module).__name__}.forward, "
            f"each artifact in the network's place ({why})"
        )
    elif why:
        takes_batch = False
        notes.append(
            f"'{network.name}' artifacts checked on the example input only (outputs compared, no metric): {why}"
        )
    if not takes_batch or run.batches is None:
        return {"batches": [call.args], "get_input": _as_given, "get_target": _no_target}
    data = {
        "batches": OnDevice(run.batches, lambda batch: to_device(trainer, pl_module, batch)),
        "metric": _artifact_metric(run, options),
        "get_input": run.binding.input_of,
        "get_target": run.binding.target_of,
        "max_batches": options.max_verify_batches,
    }
    return data | ({"through": through} if through is not None else {})


def _runs_once(run: Run, network: Network) -> bool:
    """Whether the forward calls ``network`` once, at its path (so that an artifact can stand in for it)."""
    calls = []
    handle = network.holder(run.pl_module).register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with eval_mode(run.pl_module), run.forward_context():
            run.forward(run.example, [network])
    except Exception:  # noqa: BLE001 - a forward that cannot run here cannot carry an artifact either
        return False
    finally:
        handle.remove()
    return len(calls) == 1


def _through(run: Run, network: Network) -> Callable[[Any], Callable[..., Any]]:
    """Maps a network (the original, or an artifact loaded as a function) to the LightningModule's forward with
    it in ``network``'s place: what the metric scores, as in the fused network's verification."""

    def through(net: Any) -> Callable[..., Any]:
        module = net if isinstance(net, nn.Module) else StandIn(net)

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = kwargs if kwargs else args  # as call_with_input unpacked it
            with Swap(run.pl_module, {network.path: module}), eval_mode(run.pl_module), run.forward_context():
                return run.forward(x, [network])

        return forward

    return through


def _int8_inputs(
    run: Run, options: FuseOptions, network: Network, data: dict[str, Any], notes: list[str]
) -> tuple[Int8Options | None, Iterable[Any] | None]:
    """The int8 options and the calibration batches for ``network``'s artifacts; ``(None, None)``, with a note,
    when there is no metric to gate int8 with or no training data to calibrate on."""
    int8 = options.int8 if isinstance(options.int8, Int8Options) else None
    if int8 is None:
        return None, None
    if "through" in data:
        notes.append(
            f"'{network.name}' int8 not made: its artifacts are verified through the LightningModule's forward, "
            "which int8 calibration does not run"
        )
        return None, None
    if data.get("metric") is None:
        notes.append(
            f"'{network.name}' int8 not made: no task metric checks its artifacts (checked on outputs only, or "
            "no metric could be chosen: give FuseOnExport(metric=...)), and max_metric_drop is a metric budget"
        )
        return None, None
    trainer, pl_module = run.trainer, run.pl_module
    given = options.calibration_dataloader is not None
    try:
        if options.calibration_dataloader is not None:
            batches = read_batches(options.calibration_dataloader, int8.calibration_batches)
        else:  # the Trainer's form: a loader, or a list/dict of loaders
            batches = calibration_batches(compat.training_dataloader(trainer), int8.calibration_batches)
        calibration: Iterable[Any] = [to_device(trainer, pl_module, batch) for batch in batches]
    except Exception as err:  # noqa: BLE001 - raised again where int8 is made, failing only the int8 artifacts
        return int8, _Unreadable(err)
    if not batches:
        notes.append(
            f"'{network.name}' int8 not made: no training data to calibrate on in `trainer.{trainer_fn(trainer)}`. "
            "int8 is made after fit, or give FuseOnExport(calibration_dataloader=...)"
        )
        return None, None
    info(
        trainer,
        f"FuseOnExport: int8 {list(int8.formats)} of '{network.name}': calibrating on {len(batches)} "
        f"{'calibration_dataloader' if given else 'training'} batch(es), then checking against "
        f"max_metric_drop={int8.max_metric_drop:g}",
    )
    return int8, calibration


class _Unreadable:
    """Calibration data that could not be read: iterating it raises what reading raised."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __iter__(self) -> Iterator[Any]:
        raise self.error


def _gives_forward_layout(run: Run, network: nn.Module, call: Call) -> bool:
    """Whether ``network``'s output has the tree structure and leaf shapes of the forward's output, so that the
    metric computed on the forward's outputs accepts the network's."""
    with eval_mode(run.pl_module), run.forward_context():
        mine = network(*call.args, **call.kwargs)
        theirs = run.forward(run.example, list(run.fused or run.unfolded))
    return layout(mine) == layout(theirs)


def _artifact_metric(run: Run, options: FuseOptions) -> Metric | MetricCollection | None:
    """A fresh copy of the metric the fused network was verified with (the user's, or the default chosen)."""
    if options.metric is not None:
        return copy.deepcopy(options.metric)
    chosen = run.verifier.metric_original if run.verifier is not None else None
    if chosen is None:
        return None
    fresh = chosen.clone()
    fresh.reset()
    return fresh


class StandIn(nn.Module):
    """A loaded artifact (a function) in a network's place inside the LightningModule."""

    def __init__(self, runner: Callable[..., Any]) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, *args: Any) -> Any:
        return self.runner(*args)


def checkpoint_artifact(pl_module: Any, network: Network, checkpoint: DeployCheckpoint) -> Artifact:
    """The deploy checkpoint as an artifact of ``network``: the network of the module reloaded from it."""
    reloaded = checkpoint.module
    if reloaded is None:  # write_deploy_checkpoint returns the module it reloaded
        raise RuntimeError(f"the deploy checkpoint {checkpoint.path} was written but not reloaded")
    runner = (reloaded if network.is_self else network.module(reloaded)).eval()
    how = (
        "load_from_checkpoint (strict)"
        if checkpoint.loaded_with == "load_from_checkpoint"
        else "load_state_dict (strict, into a copy of the module)"
    )
    return Artifact(
        format=CHECKPOINT_FORMAT,
        path=checkpoint.path,
        runtime=f"{type(pl_module).__name__}.{how}",
        runner=runner,
        error=checkpoint.error,
        notes=[f"{checkpoint.mismatch}; judged on the verification data"] if checkpoint.mismatch else [],
    )


def deploy_data(reports: dict[str, DeployReport], several: bool) -> dict[str, Any]:
    """The ``"artifacts"``, ``"eager"`` and ``"latency"`` of the report; per network when there are several."""
    if not several:
        return next(iter(reports.values())).to_dict() if reports else {}
    data: dict[str, Any] = {"artifacts": {}, "eager": {}, "latency": {}}
    for name, report in reports.items():
        part = report.to_dict()
        data["artifacts"] |= {f"{name}.{fmt}": entry for fmt, entry in part["artifacts"].items()}
        data["eager"][name] = part["eager"]
        data["latency"][name] = part["latency"]
    return data


def dynamic_batch(wanted: bool, args: tuple[Any, ...]) -> tuple[bool, str]:
    """Whether to export with a dynamic batch dimension, and why not when it was asked for and cannot be.

    Example:
        >>> dynamic_batch(True, (torch.zeros(4, 3),)), dynamic_batch(True, (torch.zeros(1, 3),))[0]
        ((True, ''), False)
    """
    if not wanted:
        return False, ""
    if any(isinstance(a, (list, tuple)) for a in args):
        return False, "its input is a list of tensors, which has no batch dimension to make dynamic"
    sizes = sorted(leading_sizes(args))
    if sizes and sizes[0] < 2:
        return False, f"it receives batches of {sizes[0]} here, and a dynamic batch needs an example of 2 or more"
    return True, ""


def takes_example(call: Call, example: Any) -> bool:
    """Whether the network received the forward's input itself, so that the batches' inputs can feed its artifacts."""
    args = example if isinstance(example, tuple) else (example,)
    return not call.kwargs and len(call.args) == len(args) and all(a is b for a, b in zip(call.args, args))


def layout(tree: Any) -> tuple[Any, list[Any]]:
    """The pytree structure of ``tree`` and the shape of each leaf (its type for non-tensors)."""
    leaves, spec = tree_flatten(tree)
    return spec, [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x) for x in leaves]


def _as_given(batch: Any) -> Any:
    return batch


def _no_target(batch: Any) -> None:
    return None

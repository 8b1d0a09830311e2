"""``FuseOnExport``: the Lightning callback that fuses, verifies and exports at the right moments.

The callback decides *when* things happen and delegates *what* happens: :func:`fx_lightning.fuse` folds,
:class:`fx_lightning.verify.Verifier` compares the original and fused networks with torchmetrics,
:mod:`fx_lightning.deploy` writes and checks the artifacts, :mod:`.networks` puts fused networks in place and back,
:mod:`.batches` finds the batches, and every use of Lightning's internals sits in :mod:`.compat`.

When, in one picture::

    fit:      setup (checks, callback moved last) -> on_fit_start (checks on the first batch: input, target,
              forward signature) -> train -> on_train_end (after every other callback's): fuse copies -> verify
              -> export artifacts and the deploy checkpoint; the user's networks stay in place throughout
    test/predict (and validate if asked):
              Lightning restores ckpt_path -> on_*_epoch_start (after every other callback's, so an averaging
              callback's weights are in place): fuse the weights in place now -> verify -> for each batch:
              on_*_batch_start swaps the fused networks in -> the step -> on_*_batch_end puts the user's back
              -> on_*_end (or on_exception): the fused networks forgotten

One class serves both ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``: it derives from the
``Callback`` class of each namespace that is installed.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback as _LightningCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_leaves
from torchmetrics import Metric, MetricCollection

from fx_lightning.deploy.export import Artifact, MissingExtraError, write_artifacts
from fx_lightning.deploy.flow import DeployReport, verify_artifacts
from fx_lightning.deploy.formats import registered_exporters
from fx_lightning.deploy.int8.quantize import (
    SUFFIX,
    Int8Options,
    int8_options,
    quantize_artifacts,
    read_batches,
    unmade,
)
from fx_lightning.fusion.api import fuse
from fx_lightning.fusion.probe import Call, capture_calls, count_batch_norms
from fx_lightning.fusion.report import FusionReport
from fx_lightning.fusion.tracing import is_frozen_batch_norm
from fx_lightning.lightning import compat
from fx_lightning.lightning.batches import (
    Batches,
    OnDevice,
    calibration_batches,
    keep_one_shot,
    to_device,
    verification_batches,
)
from fx_lightning.lightning.deploy_checkpoint import CHECKPOINT_FILE, DeployCheckpoint, write_deploy_checkpoint
from fx_lightning.lightning.networks import (
    SELF,
    Network,
    Swap,
    find_networks,
    is_fused,
    named_network,
    replacements,
    restore_original,
    without_pruning,
)
from fx_lightning.lightning.result import FuseResult, Outcome, agreement_text
from fx_lightning.verify.verifier import (
    Verifier,
    call_with_input,
    check_max_batches,
    check_metric,
    check_tolerance,
    default_get_input,
    default_get_target,
    eval_mode,
    preserved_rng,
)

try:  # the standalone package is installed next to ``lightning``; users may build either Trainer
    from pytorch_lightning.callbacks import Callback as _PLCallback

    _CALLBACK_BASES: tuple[type, ...] = (_LightningCallback, _PLCallback)
except ImportError:  # pragma: no cover - depends on the environment
    _CALLBACK_BASES = (_LightningCallback,)

__all__ = ["SELF", "FuseOnExport", "FuseResult", "Outcome", "is_fused", "restore_original"]

Stage = Literal["test", "predict", "validate"]
ExportStage = Literal["fit", "test", "predict", "validate"]
OnMismatch = Literal["revert", "raise", "warn"]

#: The deploy checkpoint, written next to the other artifacts (see :mod:`fx_lightning.lightning.deploy_checkpoint`).
CHECKPOINT_FORMAT = "ckpt"
#: Checkpoints written by earlier versions after ``fit`` carried the unfused weights under this key.
LEGACY_UNFUSED_STATE_KEY = "fx_lightning_unfused_state_dict"
REPORT_FILE = "fuse_report.json"

_ON_MISMATCH = ("revert", "raise", "warn")
_COMPILED_NOTE = (
    "{name} runs compiled (torch.compile): its networks were fused, verified and exported through its own "
    "uncompiled forward{loop}"
)
_STAGES = ("test", "predict", "validate")
_EXPORT_STAGES = ("fit", "test", "predict", "validate")


class FuseOnExport(*_CALLBACK_BASES):  # type: ignore[misc]
    """Fuse BatchNorm into the LightningModule's networks after training and for test/predict, verify, export.

    At the end of a successful ``fit`` (after every other callback's ``on_train_end``, so averaged or pruned
    weights are the ones fused), the LightningModule's networks are fused into copies with
    :func:`fx_lightning.fuse`, compared with the originals on the validation data using torchmetrics, and
    exported. The user's networks are never replaced after ``fit``: the LightningModule holds the same objects,
    classes and ``state_dict`` layout as without the callback, and checkpoints written during training are
    ordinary ones that resume exactly.

    At the start of the ``test``/``predict`` (and ``validate`` if asked) epoch, after every other callback's epoch
    hook, the networks are fused again from the weights in place at that moment (so
    ``trainer.test(ckpt_path="best")`` tests the best weights, fused, and ``validate`` the average an
    ``EMAWeightAveraging`` swapped in), verified, and swapped in around each step of that loop only: the user's
    networks are back at every batch end, for every epoch-level hook, at the loop's end and on any exception. A
    checkpoint written inside such a loop holds the user's networks' values. A LightningModule that runs
    compiled (``trainer.test(torch.compile(model))``, ``model.compile()``) is fused through its own uncompiled
    ``forward``; its compiled steps run the fused networks.

    The fused networks as objects: ``callback.fused`` maps each network's name to its fused copy, of the user's
    class (``callback.fused["net"]``; ``callback.fused["self"]`` is a fused copy of the whole LightningModule
    when its own ``forward`` wires its layers). The deploy checkpoint artifact (``deploy.ckpt``) is a Lightning
    checkpoint of the user's class with the folded values: ``MyModule.load_from_checkpoint(path)`` loads it
    strictly and computes what the fused networks compute; it is reloaded and checked before it is announced.

    Args:
        attributes: names (dotted paths allowed) of the LightningModule's networks to fuse, or ``["self"]`` for
            the LightningModule's own layers. ``None`` finds them: every child containing a BatchNorm (each entry
            of ``ModuleDict``/``ModuleList`` children on its own), or the LightningModule itself when it holds
            bare layers (a BatchNorm as a direct child). Networks behind ``torch.compile`` are fused and compiled
            again the same way. A network that ``forward`` never calls (a teacher, an EMA copy) is skipped with
            a note.
        stages: the Trainer calls, besides the end of ``fit``, before which the networks are fused:
            any of ``"test"``, ``"predict"``, ``"validate"``. ``None`` means ``["test", "predict"]``.
        fuse_after_fit: fuse, verify and export at the end of a successful ``fit``.
        verify: compare the original and fused networks before using the fused ones.
        metric: the torchmetrics metric (or ``MetricCollection``) computed for both networks. ``None`` infers a
            multiclass accuracy from the outputs and targets. From YAML, give it with ``class_path``.
        tolerance: verification passes when ``|metric_fused - metric_original| <= tolerance`` for each metric.
        on_mismatch: what to do when verification fails: ``"revert"`` to the original network (with a
            warning), ``"raise"`` a ``RuntimeError``, or ``"warn"`` and use the fused network.
        max_verify_batches: verify on at most this many batches; ``None`` uses every batch the Trainer's
            ``limit_val_batches`` (or the loop's own limit) allows.
        verify_dataloader: data to verify on instead of the validation dataloader (set from Python); a one-shot
            iterable (a generator) is read once and kept.
        get_input: takes a batch and returns the LightningModule's forward input (a tuple is unpacked into
            positional arguments, a dict into keyword arguments when ``forward`` takes those names). ``None``
            takes the first element of tuple/list batches, or the ``"input"``/``"x"``/``"image"``/
            ``"pixel_values"`` entry of dict batches; when the first element alone does not fit ``forward``
            (``forward(x, mask)`` with ``(x, mask, y)`` batches), the leading elements that fill its required
            positional parameters, as the summary says.
        get_target: takes a batch and returns the targets for ``metric``; ``None`` takes the second element
            of tuple/list batches (the element after the inputs when several are bound), or the
            ``"target"``/``"label"``/``"labels"``/``"y"`` entry of dict batches.
        example_input: the forward input used for shape propagation, kernel counts and export; ``None`` takes
            it from the first verification batch.
        export_dir: directory for the artifacts and the JSON report; ``None`` uses ``<trainer.log_dir>/fused``.
            The fusions that export write ``fuse_report.json``; the others ``fuse_report.<stage>.json``, so that
            a test after fit never overwrites the deploy report.
        export_formats: artifacts to write: ``"pt2"`` (``torch.export``), ``"weights"`` (a state dict as
            ``.safetensors``, or ``.pt`` for ``torch.load(weights_only=True)`` without safetensors), ``"onnx"``
            (needs ``pip install "fx-lightning[onnx]"``), any other format registered in
            :mod:`fx_lightning.deploy.formats`, and ``"ckpt"`` (the deploy checkpoint). Each format's extras are checked
            here. ``None`` means ``["pt2", "weights", "ckpt"]``; ``[]`` writes only the report. Nothing is exported
            when nothing folded.
        export_stages: the Trainer calls after whose fusion the artifacts are written: any of ``"fit"``,
            ``"test"``, ``"predict"``, ``"validate"``. ``None`` means ``["fit", "test"]``. Every artifact is
            loaded back in the runtime that runs it and checked with ``metric`` and ``tolerance`` over the batches
            the fused network was verified on (:func:`fx_lightning.deploy.flow.verify_artifacts`); one that fails is
            renamed ``<name>.FAILED.<suffix>``, not announced, and named in a warning (an error with
            ``strict=True``). ``fuse_report.json`` holds each artifact's check and latency under ``"artifacts"``.
        export_options: per-format options for the writers and their runtimes, e.g.
            ``{"onnx": {"optimization_level": "basic"}}`` to check the ONNX file at the level it is deployed with
            (see :mod:`fx_lightning.deploy.formats`). Checked here, against ``export_formats``.
        deploy_latency_budget: seconds spent timing the artifacts and both eager networks on the example input
            after they are checked; ``0`` skips the timing.
        int8: opt-in int8 versions of the float artifacts (:class:`~fx_lightning.deploy.int8.quantize.Int8Options`, or a
            dict of its fields from YAML): ``{"formats": ["onnx"], "calibration_batches": 8, "max_metric_drop": 0.01,
            "max_float_layers": 4}``. Each is static post-training quantization (per-channel weights) of the float
            artifact of its format, which is written too, calibrated on the first ``calibration_batches`` training
            batches (read in eval mode; the network, its BatchNorm statistics and the random state are untouched),
            checked in its runtime with ``metric`` against ``max_metric_drop`` (absolute) instead of ``tolerance``. Over
            budget, the layers with the largest error alone on the calibration data are kept in float one at a time, up
            to ``max_float_layers``; still over budget, it is not announced and the warning says by how much it missed.
            The deploy table and ``fuse_report.json`` show the int8 rows (``"onnx-int8"``) with the metric drop, the
            latency against the float artifact, the layers kept in float and the calibration time. ``"aoti"`` (torchao's
            PT2E flow, the ``torchao`` extra) makes an x86 CPU package. Without a task metric (outputs-only checks) int8
            is skipped with a note; a failure in int8 fails only the int8 artifacts. ``None``: no int8.
        calibration_dataloader: data to calibrate int8 on instead of the training dataloader (set from Python).
        dynamic_batch: export ``pt2``/``onnx`` with a dynamic batch dimension (checked on a second batch size);
            ``False`` fixes the batch size of the example input. A network that receives a list of tensors, or
            batches of one, is exported with fixed shapes, with a note.
        passes: the fusion passes to run (see :func:`fx_lightning.registered_passes`); ``None`` runs all.
        strict: raise instead of warning when anything after training fails (the data, the engine, the
            verification, the exporter), and on a failed verification whatever ``on_mismatch`` says.

    Raises:
        ValueError: if an argument is out of its range.
        TypeError: if ``metric`` is not a torchmetrics ``Metric`` or ``MetricCollection``, or ``tolerance`` is
            not a number.
        fx_lightning.deploy.export.MissingExtraError: if ``"onnx"`` is asked for without the ``onnx`` extra installed.

    Example::

        from lightning.pytorch import Trainer
        from fx_lightning import FuseOnExport

        fuse = FuseOnExport(tolerance=1e-3)
        trainer = Trainer(max_epochs=5, callbacks=[fuse])
        trainer.fit(model, datamodule=dm)   # model.net is still yours; fused, verified, exported copies
        deployed = fuse.fused["net"]        # the fused network, of your network's class
        trainer.test(datamodule=dm)         # best checkpoint, fused again, tested; your network put back
    """

    def __init__(
        self,
        attributes: list[str] | None = None,
        stages: list[Stage] | None = None,
        fuse_after_fit: bool = True,
        verify: bool = True,
        metric: Metric | MetricCollection | None = None,
        tolerance: float = 1e-3,
        on_mismatch: OnMismatch = "revert",
        max_verify_batches: int | None = None,
        verify_dataloader: Iterable[Any] | None = None,
        get_input: Callable[[Any], Any] | None = None,
        get_target: Callable[[Any], Any] | None = None,
        example_input: Any = None,
        export_dir: str | None = None,
        export_formats: list[str] | None = None,
        export_stages: list[ExportStage] | None = None,
        export_options: dict[str, dict[str, Any]] | None = None,
        deploy_latency_budget: float = 1.0,
        int8: dict[str, Any] | None = None,
        calibration_dataloader: Iterable[Any] | None = None,
        dynamic_batch: bool = True,
        passes: list[str] | None = None,
        strict: bool = False,
    ) -> None:
        _check_arguments(attributes, stages, on_mismatch, max_verify_batches, export_formats, export_stages)
        self.int8: Int8Options | None = int8_options(int8, "FuseOnExport")
        _check_export_options(export_options, export_formats, deploy_latency_budget, self.int8)
        check_metric("FuseOnExport", metric)
        self.attributes = list(attributes) if attributes is not None else None
        self.stages: list[str] = list(stages) if stages is not None else ["test", "predict"]
        self.fuse_after_fit = fuse_after_fit
        self.verify = verify
        self.metric = metric
        self.tolerance = check_tolerance("FuseOnExport", "tolerance", tolerance)
        self.on_mismatch = on_mismatch
        self.max_verify_batches = max_verify_batches
        self.verify_dataloader = verify_dataloader
        self.get_input = get_input
        self.get_target = get_target
        self.example_input = example_input
        self.export_dir = export_dir
        self.export_formats: list[str] = (
            list(export_formats) if export_formats is not None else ["pt2", "weights", CHECKPOINT_FORMAT]
        )
        self.export_stages: list[str] = list(export_stages) if export_stages is not None else ["fit", "test"]
        self.export_options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (export_options or {}).items()}
        self.deploy_latency_budget = float(deploy_latency_budget)
        self.calibration_dataloader = calibration_dataloader
        self.dynamic_batch = dynamic_batch
        self.passes = list(passes) if passes is not None else None
        self.strict = strict
        self.last_result: FuseResult | None = None
        self.history: list[dict[str, Any]] = []
        #: The fused copy of each network from the latest fusion that used them (name -> module).
        self.fused: dict[str, nn.Module] = {}
        self._swap: Swap | None = None
        # When the running validation epoch of fit started, and how long the last one took: the yardstick the
        # summary measures the work after fit against.
        self._epoch_started: float | None = None
        self._epoch_seconds: float | None = None
        #: How many leading elements of a tuple/list batch the default input binds to forward (None: the first).
        self._leading: int | None = None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Runs at the start of every Trainer call, before Lightning restores ``ckpt_path``: rejects strategies
        that cannot work, puts the user's networks back if a loop left fused ones, checks the network names,
        keeps a one-shot ``verify_dataloader``, and moves this callback last so that its ``on_train_end`` and
        ``on_*_epoch_start`` see the weights every other callback leaves (EMA, SWA, pruning)."""
        reason = compat.unsupported_strategy(trainer)
        if reason:
            raise ValueError(reason)
        if self._restore():
            _info(trainer, f"FuseOnExport: put the original network(s) back before `trainer.{_fn(trainer)}`.")
        self._networks(pl_module)
        self.verify_dataloader = keep_one_shot(self.verify_dataloader, self.max_verify_batches)
        if self.int8 is not None:
            self.calibration_dataloader = keep_one_shot(self.calibration_dataloader, self.int8.calibration_batches)
        if (stage == "fit" and self.fuse_after_fit) or stage in self.stages:
            compat.move_to_end(trainer, self)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs before training, with the module on its device: checks what can be checked on the first
        verification batch (the input and target layout, the forward signature), so that
        a misconfiguration fails now rather than after training."""
        if self.fuse_after_fit:
            with preserved_rng(), compat.uncompiled(pl_module):
                self._check_inputs(trainer, pl_module, "fit")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs once training finished normally, with the module still on its device: fuses copies, verifies and
        exports. The user's networks stay in place (``on_fit_end`` would see the module moved to the CPU)."""
        if self.fuse_after_fit:
            self._fuse(trainer, pl_module, "fit")

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs in a ``trainer.validate`` loop (not validation inside ``fit``) after every other callback's
        ``on_validation_epoch_start`` (an averaging callback has swapped its weights in): fuses those weights if
        ``"validate"`` is in ``stages``; the fused networks go in per batch."""
        if _fn(trainer) == "fit" and not trainer.sanity_checking:
            self._epoch_started = time.perf_counter()
        if _fn(trainer) == "validate" and "validate" in self.stages:
            self._fuse(trainer, pl_module, "validate")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after each validation epoch: inside ``fit``, notes how long it took (the summary of the work after
        ``fit`` puts its seconds beside it)."""
        if _fn(trainer) == "fit" and self._epoch_started is not None:
            self._epoch_seconds = time.perf_counter() - self._epoch_started
            self._epoch_started = None

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs before each ``trainer.validate`` step, after the other callbacks' batch hooks: swaps in."""
        if _fn(trainer) == "validate":
            self._swap_in()

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs after each ``trainer.validate`` step: puts the user's networks back, so that every epoch-level hook
        (an averaging callback swapping its weights back by position) sees the user's networks."""
        if _fn(trainer) == "validate":
            self._swap_out()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after a ``trainer.validate`` loop: forgets the fused networks (the user's are in place)."""
        if _fn(trainer) == "validate":
            self._restore()

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs after Lightning loaded ``ckpt_path`` and after every other callback's ``on_test_epoch_start``:
        fuses the weights in place now; the fused networks go in per batch."""
        if "test" in self.stages:
            self._fuse(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs before each test step, after the other callbacks' batch hooks: swaps the fused networks in."""
        self._swap_in()

    def on_test_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs after each test step: puts the user's networks back for every hook until the next step."""
        self._swap_out()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after the test loop: forgets the fused networks (the user's are in place)."""
        self._restore()

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs after Lightning loaded ``ckpt_path`` and after every other callback's ``on_predict_epoch_start``:
        fuses the weights in place now; the fused networks go in per batch."""
        if "predict" in self.stages:
            self._fuse(trainer, pl_module, "predict")

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs before each predict step, after the other callbacks' batch hooks: swaps the fused networks in."""
        self._swap_in()

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs after each predict step: puts the user's networks back for every hook until the next step."""
        self._swap_out()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after the predict loop: forgets the fused networks (the user's are in place)."""
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Runs when any Trainer call raises: puts the user's networks back so nothing fused remains."""
        self._restore()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Runs when Lightning writes a full checkpoint: inside a loop that runs fused networks, writes the user's
        networks' values instead, so that every checkpoint loads into the user's class and resumes exactly."""
        swap = self._swap
        if swap is None or not swap.installed:
            return
        swap.restore()
        try:
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
        finally:
            swap.install()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Runs after Lightning loaded a checkpoint's ``state_dict``: a checkpoint written by an earlier version
        after ``fit`` carries the unfused weights separately; they are loaded so that training resumes from them.
        One written before :attr:`state_key` named the options holds this callback's state under the class name,
        which Lightning does not look up: it is loaded from there."""
        unfused = checkpoint.get(LEGACY_UNFUSED_STATE_KEY)
        if unfused:
            state = dict(checkpoint["state_dict"]) | dict(unfused)
            pl_module.load_state_dict(state, strict=pl_module.strict_loading)
        states = checkpoint.get("callbacks") or {}
        old_key = type(self).__qualname__
        if self.state_key not in states and isinstance(states.get(old_key), dict):
            self.load_state_dict(copy.deepcopy(states[old_key]))

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: its class and the options that tell two instances in
        one Trainer apart (which networks, where it exports), as Lightning's own callbacks do."""
        return self._generate_state_key(attributes=self.attributes, export_dir=self.export_dir)

    def state_dict(self) -> dict[str, Any]:
        """Runs when a checkpoint is written: the callback's own state, plain data only."""
        return {"history": copy.deepcopy(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Runs when a checkpoint is restored with this callback present: brings back the fusion history of a
        resumed run (a callback that already fused keeps its own, newer history, e.g. for ``ckpt_path="best"``)."""
        if not self.history:
            self.history = list(state_dict.get("history", []))

    # --------------------------------------------------------------- the work

    def _fuse(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Fuse, verify, export and report, inside one error boundary; swap in for a loop when the outcome says so.

        Test/predict loops run under inference mode; tensors created there could never be used for autograd
        again, so everything runs outside it. The global random state is left as found.
        """
        result = FuseResult(stage=stage, ckpt_path=_str_or_none(trainer.ckpt_path))
        if stage == "fit":
            result.validation_epoch_seconds = self._epoch_seconds
        with torch.inference_mode(False), torch.no_grad(), preserved_rng(), compat.uncompiled(pl_module) as compiled:
            # trainer.log_dir broadcasts under DDP: every rank asks for it, before anything can fail.
            directory = self._export_directory(trainer)
            result.report_path = str(directory / report_file(stage, self.export_stages))
            run = _Run(trainer, pl_module, stage, result)
            if compiled:
                loop = "" if stage == "fit" else f"; the {stage} loop's compiled steps run the fused networks"
                result.notes.append(_COMPILED_NOTE.format(name=type(pl_module).__name__, loop=loop))
            failure = None
            try:
                self._prepare(run)
            except Exception as err:  # the error boundary: a finished training run is never lost
                failure = err
            # Every rank votes before the next collective (metric synchronisation), whatever failed locally.
            everyone_ok = bool(trainer.strategy.reduce_boolean_decision(failure is None, all=True))
            if everyone_ok and run.verifier is not None:
                failure = self._verify(run)
            elif failure is None and not everyone_ok:
                failure = RuntimeError("another process failed; see its warning")
            if failure is not None:
                result.outcome = Outcome.FAILED
                result.error = f"{run.step}: {type(failure).__name__}: {failure}"
            if stage in self.export_stages and (
                result.outcome.in_place or (result.outcome is Outcome.NOTHING_FOLDED and self._exports_unfolded(run))
            ):
                self._export(run, directory)
            if result.outcome.in_place:
                self.fused = {network.name: module for network, module in run.fused.items()}
        self._report(trainer, result)
        if result.outcome.in_place and stage != "fit":
            self._swap = Swap(pl_module, run.replacements)  # installed around each step of the loop
        self._raise_or_warn(trainer, result, failure)

    def _prepare(self, run: _Run) -> None:
        """Everything each process does on its own: data, example input, fusion, counts, verification updates."""
        trainer, pl_module, result = run.trainer, run.pl_module, run.result
        networks = self._networks(pl_module)
        if not networks:
            result.outcome = Outcome.NO_BATCH_NORM
            result.notes.append(
                f"no BatchNorm in the children of {type(pl_module).__name__}; nothing to fuse. Name the network "
                "with FuseOnExport(attributes=['net']) if it is nested deeper."
            )
            return
        result.attributes = [n.name for n in networks]
        run.step = "reading the verification data"
        run.batches = verification_batches(trainer, run.stage, self.verify_dataloader, self.max_verify_batches)
        run.first = first = run.batches.first()
        binding = self._bind_inputs(pl_module, networks, first)
        if binding:
            result.notes.append(binding)
        run.example = self._example_input(trainer, pl_module, first)
        calls: dict[Network, Call] = {}
        if run.example is not None:
            run.step = "the forward that captures the networks' inputs"
            calls = self._capture(run, networks)
            for network in networks:
                if network not in calls:
                    result.notes.append(
                        f"'{network.name}' skipped: {type(pl_module).__name__}.forward never calls it (a teacher or "
                        "an averaged copy?); it cannot be verified nor exported, so it is not fused"
                    )
            networks = [n for n in networks if n in calls]
            result.attributes = [n.name for n in networks]
        run.calls = calls

        start = time.perf_counter()
        try:
            run.step = "fx_lightning.fuse"
            for network in networks:
                original = network.module(pl_module)
                call = calls.get(network)
                example = call.args if call is not None and not call.kwargs else None
                fused = fuse(without_pruning(original), example_inputs=example, passes=self.passes)
                report: FusionReport = fused.fusion_report
                result.reports[network.name] = report
                if report.num_folded or report.merged:
                    run.fused[network] = fused
                else:
                    result.notes.append(_nothing_folded(network, original, report))
                    run.unfolded[network] = fused
            if not run.fused:  # BatchNorms were found, none folded (or no network that forward calls has one)
                result.outcome = Outcome.NOTHING_FOLDED
                return
            run.step = "swapping in the fused networks"
            for network, fused in run.fused.items():
                run.replacements |= replacements(pl_module, network, fused)
            if calls:
                run.step = "counting the BatchNorm kernels"
                result.kernels_before, result.kernels_after = self._count(run)
        finally:
            result.seconds["fuse"] = time.perf_counter() - start

        if not self.verify:
            result.verify_source = "skipped: verify=False"
        elif first is None:
            result.verify_source = "skipped: no validation data (give verify_dataloader=...)"
        else:
            run.step = "the verification pass"
            self._update_verification(run)

    def _capture(self, run: _Run, networks: list[Network]) -> dict[Network, Call]:
        pl_module = run.pl_module
        # the holder: hooks on the module behind torch.compile would not run inside the compiled frame
        modules = {n.name: n.holder(pl_module) for n in networks if not n.is_self}
        with eval_mode(pl_module), run.trainer.precision_plugin.forward_context():
            captured = capture_calls(lambda: self._forward(pl_module, run.example, networks), modules)
        calls = {n: captured[n.name] for n in networks if n.name in captured}
        for network in networks:
            if network.is_self:
                x = run.example
                calls[network] = Call(x if isinstance(x, tuple) else (x,)) if not isinstance(x, dict) else Call((), x)
        return calls

    def _count(self, run: _Run) -> tuple[int, int]:
        before = after = 0
        with run.trainer.precision_plugin.forward_context():
            for network, fused in run.fused.items():
                call = run.calls[network]
                original = network.module(run.pl_module)
                with eval_mode(original):
                    before += count_batch_norms(lambda m=original, c=call: m(*c.args, **c.kwargs), original)
                after += count_batch_norms(lambda m=fused, c=call: m(*c.args, **c.kwargs), fused)
        return before, after

    def _update_verification(self, run: _Run) -> None:
        trainer, pl_module = run.trainer, run.pl_module
        networks = list(run.fused)
        run.verifier = verifier = Verifier(
            metric=copy.deepcopy(self.metric) if self.metric is not None else None,
            tolerance=self.tolerance,
            get_input=self._input_of,
            get_target=self._target_of,
        ).to(pl_module.device)
        start = time.perf_counter()

        def runner(modules: dict[str, nn.Module]) -> Callable[..., Any]:
            def run_forward(*args: Any, **kwargs: Any) -> Any:
                x = kwargs if kwargs else args  # as call_with_input unpacked it
                with Swap(pl_module, modules), trainer.precision_plugin.forward_context():
                    return self._forward(pl_module, x, networks)

            return run_forward

        original, fused = runner({}), runner(run.replacements)
        # Where outputs are post-processed (detections), the sub-modules' continuous outputs are compared instead.
        parts = (networks[0].module(pl_module), run.fused[networks[0]]) if len(networks) == 1 else None
        assert run.batches is not None  # set by _prepare
        world, rank = trainer.world_size, trainer.global_rank
        with eval_mode(pl_module):
            target = self._target_of(run.first)
            if self.metric is None and target is not None:
                # Every process chooses the metric now, even one that gets no batch, so that all synchronise it.
                verifier.default_metric_for(call_with_input(original, run.example), target)
            batches = _progress(trainer, run.batches)
            for index, batch in enumerate(batches):
                # Each rank takes every world-th batch of the unsharded data: an exact partition, so the
                # synchronised metric equals the single-process one.
                if index % world == rank:
                    verifier.update(original, fused, to_device(trainer, pl_module, batch), parts=parts)
            if hasattr(batches, "close"):
                batches.close()
        run.result.verify_source = run.batches.describe()
        run.result.seconds["verify"] = time.perf_counter() - start

    def _verify(self, run: _Run) -> Exception | None:
        """The collective part of the verification: the synchronised metrics and the vote on them."""
        trainer, result = run.trainer, run.result
        assert run.verifier is not None
        start = time.perf_counter()
        failure: Exception | None = None
        run.step = "the verification pass"
        try:
            result.verification = run.verifier.compute()
        except Exception as err:  # noqa: BLE001 - reported like any failure after training
            failure = err
        passed = failure is None and result.verification is not None and result.verification.passed
        # Every rank sees the same synchronised metric; the explicit vote also covers a rank that failed.
        passed = bool(trainer.strategy.reduce_boolean_decision(passed, all=True))
        result.seconds["verify"] = result.seconds.get("verify", 0.0) + time.perf_counter() - start
        if failure is None and not passed:
            result.outcome = (
                Outcome.KEPT_DESPITE_MISMATCH if self.on_mismatch == "warn" and not self.strict else Outcome.REVERTED
            )
        return failure

    def _export(self, run: _Run, directory: Path) -> None:
        """Write the artifacts on global rank zero (the user's networks in place) and share the outcome."""
        trainer, result = run.trainer, run.result
        status: dict[str, Any] = {"artifacts": {}, "deploy": {}, "table": "", "error": "", "seconds": 0.0, "notes": []}
        if trainer.is_global_zero:
            start = time.perf_counter()
            try:
                self._write_artifacts(run, directory, status)
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

    def _exports_unfolded(self, run: _Run) -> bool:
        """Whether artifacts were asked for and some network, with nothing folded, can be exported as it is."""
        return bool(run.unfolded) and bool(self.export_formats) and run.result.error == ""

    def _write_artifacts(self, run: _Run, directory: Path, status: dict[str, Any]) -> None:
        """Write every fused network's artifacts and the deploy checkpoint, then check each one in the runtime that
        runs it, over the data the fused network was verified on, and time it; fills ``status`` with the paths
        of the artifacts that passed, the deploy report and its table."""
        directory.mkdir(parents=True, exist_ok=True)
        formats = [f for f in self.export_formats if f != CHECKPOINT_FORMAT]
        if self.int8 is not None:  # an int8 artifact is made from (and compared with) its float one
            formats += [f for f in self.int8.formats if f not in formats]
        networks = run.fused or run.unfolded  # nothing folded: the networks as they are, verified the same way
        if not run.fused:
            status["notes"].append(
                f"nothing was folded in {[n.name for n in networks]} (see the notes above): the artifacts asked for "
                "are the networks as they are, verified the same way"
            )
        checkpoint: DeployCheckpoint | None = None
        checkpoint_error = ""
        if CHECKPOINT_FORMAT in self.export_formats:
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
            dynamic, why_not = _dynamic_batch(self.dynamic_batch, call.args)
            if why_not:
                status["notes"].append(f"'{network.name}' exported with fixed input shapes: {why_not}")
            written: dict[str, Artifact] = {}
            if formats:
                written = write_artifacts(
                    module,
                    call.args,
                    directory,
                    formats=tuple(formats),
                    name=network.file_stem(),
                    dynamic_batch=dynamic,
                    options={f: o for f, o in self.export_options.items() if f in formats},
                    keep_going=True,  # a format that cannot represent the network fails alone, with the reason
                )
            if not written and checkpoint is None and not checkpoint_error:
                continue
            data = self._artifact_data(run, network, call, status["notes"])
            if self.int8 is not None and written:
                written |= self._int8_artifacts(run, network, module, call, written, data, status["notes"])
            if checkpoint is not None:
                written[CHECKPOINT_FORMAT] = _checkpoint_artifact(run.pl_module, network, checkpoint)
            elif checkpoint_error:
                written[CHECKPOINT_FORMAT] = Artifact(
                    CHECKPOINT_FORMAT,
                    directory / CHECKPOINT_FILE,
                    runtime="load_from_checkpoint",
                    error=checkpoint_error,
                )
            reports[network.name] = verify_artifacts(
                written,
                network.module(run.pl_module),
                module,
                example_inputs=call.args,
                tolerance=self.tolerance,
                latency_budget_s=self.deploy_latency_budget,
                strict=self.strict,
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
        if unchecked:
            status["notes"].append(f"the deploy checkpoint is not announced: {checkpoint.error or checkpoint.mismatch}")
        if checkpoint is not None and all(a.passed for a in checked) and not unchecked:
            announced[CHECKPOINT_FORMAT] = str(checkpoint.path)
        status["artifacts"] = announced
        status["deploy"] = _deploy_data(reports, several)
        status["table"] = "\n".join(
            (f"{name}: " if several else "") + report.table() for name, report in reports.items()
        )

    def _artifact_data(self, run: _Run, network: Network, call: Call, notes: list[str]) -> dict[str, Any]:
        """What the artifacts are checked on (:func:`fx_lightning.deploy.flow.verify_artifacts`'s data arguments): the
        batches the fused network was verified on, with the same metric, re-iterable; the example input alone,
        outputs compared, when the network does not take the batch's input (or nothing was verified)."""
        trainer, pl_module = run.trainer, run.pl_module
        original = network.module(pl_module)
        takes_batch = run.batches is not None and run.first is not None and self.verify
        why = ""
        if takes_batch and not _takes_example(call, run.example):
            why = f"the network does not take {type(pl_module).__name__}.forward's input"
        elif takes_batch and not self._gives_forward_layout(run, original, call):
            # A ModelOutput, or a backbone's features: the forward maps them to what the metric scores.
            why = f"its output is not laid out as {type(pl_module).__name__}.forward's"
        through = None
        if why and not network.is_self and self._runs_once(run, network):
            through = self._through(run, network)
            notes.append(
                f"'{network.name}' artifacts verified with the metric through {type(pl_module).__name__}.forward, "
                f"each artifact in the network's place ({why})"
            )
        elif why:
            takes_batch = False
            notes.append(
                f"'{network.name}' artifacts checked on the example input only (outputs compared, no metric): {why}"
            )
        if not takes_batch:
            return {"batches": [call.args], "get_input": _as_given, "get_target": _no_target}
        assert run.batches is not None
        data = {
            "batches": OnDevice(run.batches, lambda batch: to_device(trainer, pl_module, batch)),
            "metric": self._artifact_metric(run),
            "get_input": self._input_of,
            "get_target": self._target_of,
            "max_batches": self.max_verify_batches,
        }
        return data | ({"through": through} if through is not None else {})

    def _runs_once(self, run: _Run, network: Network) -> bool:
        """Whether the forward calls ``network`` once, at its path (so that an artifact can stand in for it)."""
        calls = []
        holder = network.holder(run.pl_module)
        handle = holder.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            with eval_mode(run.pl_module), run.trainer.precision_plugin.forward_context():
                self._forward(run.pl_module, run.example, [network])
        except Exception:  # noqa: BLE001 - a forward that cannot run here cannot carry an artifact either
            return False
        finally:
            handle.remove()
        return len(calls) == 1

    def _through(self, run: _Run, network: Network) -> Callable[[Any], Callable[..., Any]]:
        """Maps a network (the original, or an artifact loaded as a function) to the LightningModule's forward with
        it in ``network``'s place: what the metric scores, as in the fused network's verification."""
        pl_module, trainer = run.pl_module, run.trainer

        def through(net: Any) -> Callable[..., Any]:
            module = net if isinstance(net, nn.Module) else _StandIn(net)

            def run_forward(*args: Any, **kwargs: Any) -> Any:
                x = kwargs if kwargs else args  # as call_with_input unpacked it
                swap = Swap(pl_module, {network.path: module})
                with swap, eval_mode(pl_module), trainer.precision_plugin.forward_context():
                    return self._forward(pl_module, x, [network])

            return run_forward

        return through

    def _int8_artifacts(
        self,
        run: _Run,
        network: Network,
        module: nn.Module,
        call: Call,
        written: dict[str, Artifact],
        data: dict[str, Any],
        notes: list[str],
    ) -> dict[str, Artifact]:
        """The int8 artifacts, calibrated on training batches and gated by the task metric
        (:func:`~fx_lightning.deploy.int8.quantize.quantize_artifacts`); none, with a note, when there is no
        metric to gate them with or no training data to calibrate on."""
        assert self.int8 is not None
        if "through" in data:
            notes.append(
                f"'{network.name}' int8 not made: its artifacts are verified through the LightningModule's forward, "
                "which int8 calibration does not run"
            )
            return {}
        if data.get("metric") is None:
            notes.append(
                f"'{network.name}' int8 not made: no task metric checks its artifacts (checked on outputs only, or "
                "no metric could be chosen: give FuseOnExport(metric=...)), and max_metric_drop is a metric budget"
            )
            return {}
        try:
            trainer, pl_module = run.trainer, run.pl_module
            count = self.int8.calibration_batches
            given = self.calibration_dataloader is not None
            if given:
                batches = read_batches(self.calibration_dataloader, count)
            else:  # the Trainer's form: a loader, or a list/dict of loaders
                batches = calibration_batches(compat.training_dataloader(trainer), count)
            if not batches:
                notes.append(
                    f"'{network.name}' int8 not made: no training data to calibrate on in `trainer.{_fn(trainer)}`. "
                    "int8 is made after fit, or give FuseOnExport(calibration_dataloader=...)"
                )
                return {}
            _info(
                trainer,
                f"FuseOnExport: int8 {list(self.int8.formats)} of '{network.name}': calibrating on {len(batches)} "
                f"{'calibration_dataloader' if given else 'training'} batch(es), then checking against "
                f"max_metric_drop={self.int8.max_metric_drop:g}",
            )
            with eval_mode(pl_module):
                return quantize_artifacts(
                    written,
                    network.module(pl_module),
                    module,
                    [to_device(trainer, pl_module, batch) for batch in batches],
                    data["batches"],
                    call.args,
                    self.int8,
                    metric=data["metric"],
                    get_input=data["get_input"],
                    get_target=data["get_target"],
                    max_batches=data["max_batches"],
                )
        except Exception as err:  # noqa: BLE001 - int8 is opt-in: its failure fails the int8 artifacts, not the export
            error = f"int8 could not be made: {type(err).__name__}: {err}"
            return {f + SUFFIX: unmade(f, written.get(f), error) for f in self.int8.formats}

    def _gives_forward_layout(self, run: _Run, network: nn.Module, call: Call) -> bool:
        """Whether ``network``'s output has the tree structure and leaf shapes of the forward's output, so that the
        metric computed on the forward's outputs accepts the network's."""
        with eval_mode(run.pl_module), run.trainer.precision_plugin.forward_context():
            mine = network(*call.args, **call.kwargs)
            theirs = self._forward(run.pl_module, run.example, list(run.fused or run.unfolded))
        return _layout(mine) == _layout(theirs)

    def _artifact_metric(self, run: _Run) -> Metric | MetricCollection | None:
        """A fresh copy of the metric the fused network was verified with (the user's, or the default chosen)."""
        if self.metric is not None:
            return copy.deepcopy(self.metric)
        chosen = run.verifier.metric_original if run.verifier is not None else None
        if chosen is None:
            return None
        fresh = chosen.clone()
        fresh.reset()
        return fresh

    def _report(self, trainer: Any, result: FuseResult) -> None:
        self.last_result = result
        data = _jsonable(result.to_dict())
        self.history.append(data)
        metrics = result.log_metrics()
        try:  # still inside the error boundary: a logger or a full disk must not lose the finished run
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
            if trainer.is_global_zero and result.report_path:
                path = Path(result.report_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(data, indent=2) + "\n")
        except Exception as err:
            if self.strict:
                raise RuntimeError(
                    f"FuseOnExport(strict=True) could not write its report to {result.report_path}: {err}"
                ) from err
            _warn(trainer, f"FuseOnExport could not write its report to {result.report_path}: {err}")
        _info(trainer, str(result))

    def _raise_or_warn(self, trainer: Any, result: FuseResult, failure: Exception | None) -> None:
        """After the report is written: raise (``strict=True``, ``on_mismatch="raise"``) or warn."""
        where = "at the end of fit" if result.stage == "fit" else f"before {result.stage}"
        if result.outcome is Outcome.FAILED:
            if self.strict:
                raise RuntimeError(
                    f"FuseOnExport(strict=True) failed {where} on {result.attributes or 'the networks'}, in "
                    f"{result.error}. The original network is in place; the report is at {result.report_path}. "
                    "Set strict=False to continue with a warning."
                ) from failure
            _warn(
                trainer,
                f"FuseOnExport failed {where} on {result.attributes or 'the networks'}, in {result.error}; "
                "continuing with the original network. Set strict=True to raise instead.",
            )
            return
        if result.error:  # the export failed; the fusion itself is fine
            if self.strict:
                raise RuntimeError(
                    f"FuseOnExport(strict=True) could not export the fused network {where}: {result.error}. "
                    "Fix the cause, choose other export_formats, or set strict=False to continue with a warning."
                )
            _warn(trainer, f"FuseOnExport: {result.error}; artifacts are missing.")
        if result.outcome is Outcome.NO_BATCH_NORM:
            _warn(trainer, f"FuseOnExport found nothing to fuse {where}: {'; '.join(result.notes)}")
        elif result.outcome is Outcome.NOTHING_FOLDED:
            _warn(trainer, f"FuseOnExport folded nothing {where}: {'; '.join(result.notes)}")
        elif result.outcome in (Outcome.REVERTED, Outcome.KEPT_DESPITE_MISMATCH):
            self._mismatch(trainer, result)

    def _mismatch(self, trainer: Any, result: FuseResult) -> None:
        v = result.verification
        assert v is not None  # only called after a verification
        diffs = ", ".join(
            f"{k} {v.metric_original[k]:.6g} (original) vs {v.metric_fused.get(k, float('nan')):.6g} (fused)"
            for k in v.metric_original
        )
        detail = (
            f"the fused network failed verification before {result.stage}: {diffs or 'outputs'}, tolerance "
            f"{v.tolerance:g}, max abs diff {v.max_abs_diff:.3g}{agreement_text(v)}"
        )
        if self.strict or self.on_mismatch == "raise":
            mode = "strict=True" if self.strict else "on_mismatch='raise'"
            raise RuntimeError(
                f"FuseOnExport({mode}): {detail}. The original network is in place. Check the fusion report, "
                "raise `tolerance` if the difference is expected, or use on_mismatch='revert' to continue."
            )
        if self.on_mismatch == "warn":
            _warn(trainer, f"FuseOnExport(on_mismatch='warn'): {detail}. Using the fused network anyway.")
        else:
            _warn(trainer, f"FuseOnExport(on_mismatch='revert'): {detail}. Reverted to the original network.")

    # -------------------------------------------------------------- helpers

    def _restore(self) -> bool:
        swap, self._swap = self._swap, None
        return swap.restore() if swap is not None else False

    def _swap_in(self) -> None:
        if self._swap is not None:
            self._swap.install()

    def _swap_out(self) -> None:
        if self._swap is not None:
            self._swap.restore()

    def _networks(self, pl_module: nn.Module) -> list[Network]:
        if self.attributes is None:
            return find_networks(pl_module)
        try:
            return [named_network(pl_module, name) for name in self.attributes]
        except (ValueError, TypeError) as err:
            raise type(err)(f"FuseOnExport(attributes={self.attributes!r}): {err}") from err

    def _forward(self, pl_module: Any, x: Any, networks: list[Network]) -> Any:
        """The LightningModule's forward on ``x``; without a ``forward`` of its own, the one network's."""
        if compat.overrides_forward(pl_module):
            return call_with_input(pl_module, x)
        if len(networks) == 1 and not networks[0].is_self:
            return call_with_input(networks[0].holder(pl_module), x)
        raise ValueError(
            f"FuseOnExport(attributes={[n.name for n in networks]!r}) needs {type(pl_module).__name__}.forward to "
            "compare the original and fused networks: define forward(), or fuse a single network with "
            "attributes=['net']."
        )

    def _check_inputs(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Fail before training on what the first verification batch shows: the input and target layout, the
        forward signature."""
        networks = self._networks(pl_module)
        if not networks:
            return
        batches = verification_batches(trainer, stage, self.verify_dataloader, self.max_verify_batches)
        batch = batches.first()
        if batch is None and self.example_input is None:
            return
        where = f"the first {batches.source} batch ({_describe(batch)})"
        self._bind_inputs(pl_module, networks, batch)
        if self.example_input is not None:
            x = self.example_input
        else:
            try:
                x = self._input_of(to_device(trainer, pl_module, batch))
            except Exception as err:
                raise type(err)(
                    f"FuseOnExport(get_input={_callable_name(self.get_input)}) could not take the network input "
                    f"from {where}: {err}"
                ) from err
        if batch is not None and self.verify:
            try:
                self._target_of(batch)
            except Exception as err:
                raise type(err)(
                    f"FuseOnExport(get_target={_callable_name(self.get_target)}) could not take the target from "
                    f"{where}: {err}"
                ) from err
        if compat.overrides_forward(pl_module):
            _check_signature(pl_module.forward, x, where)
        elif len(networks) == 1 and not networks[0].is_self:
            _check_signature(networks[0].holder(pl_module).forward, x, where)
        else:
            self._forward(pl_module, x, networks)  # raises the explanation

    def _export_directory(self, trainer: Any) -> Path:
        if self.export_dir:
            return Path(self.export_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "fused"

    def _example_input(self, trainer: Any, pl_module: Any, first_batch: Any) -> Any:
        if self.example_input is not None:
            return to_device(trainer, pl_module, self.example_input)
        if first_batch is None:
            return None
        return self._input_of(to_device(trainer, pl_module, first_batch))

    def _bind_inputs(self, pl_module: Any, networks: list[Network], batch: Any) -> str:
        """Without ``get_input``, a forward that takes several required positional inputs gets the batch's leading
        elements when the first alone does not fit it (``forward(x, mask)`` with ``(x, mask, y)`` batches); the
        target is then the element after them. Decided on ``batch``; returns the note that says so, or ``""``."""
        self._leading = None
        if self.get_input is not None or batch is None:
            return ""
        if compat.overrides_forward(pl_module):
            fn = pl_module.forward
        elif len(networks) == 1 and not networks[0].is_self:
            fn = networks[0].holder(pl_module).forward
        else:
            return ""
        count = _leading_inputs(fn, batch, with_target=self.get_target is None)
        if count is None:
            return ""
        self._leading = count
        names = ", ".join(list(inspect.signature(fn).parameters)[:count])
        owner = type(getattr(fn, "__self__", fn)).__name__
        target = f"target: element {count}" if self.get_target is None else "target: get_target"
        return (
            f"input: elements 0-{count - 1} of each batch (a {type(batch).__name__} of {len(batch)}) passed to "
            f"{owner}.forward({names}), whose first argument alone does not take element 0; {target}. Pass "
            "get_input=/get_target= to choose otherwise"
        )

    def _input_of(self, batch: Any) -> Any:
        if self.get_input is None and self._leading is not None and isinstance(batch, (tuple, list)):
            return tuple(batch[: self._leading])
        return (self.get_input or default_get_input)(batch)

    def _target_of(self, batch: Any) -> Any:
        if self.get_target is None and self._leading is not None and isinstance(batch, (tuple, list)):
            return batch[self._leading] if len(batch) > self._leading else None
        return (self.get_target or default_get_target)(batch)


@dataclass
class _Run:
    """The state of one fusion, kept apart from the callback (which outlives it) and from the user's module."""

    trainer: Any
    pl_module: Any
    stage: str
    result: FuseResult
    batches: Batches | None = None
    first: Any = None
    example: Any = None
    calls: dict[Network, Call] = field(default_factory=dict)
    fused: dict[Network, nn.Module] = field(default_factory=dict)
    #: networks with nothing folded, as fuse returned them: exported as they are when artifacts were asked for
    unfolded: dict[Network, nn.Module] = field(default_factory=dict)
    replacements: dict[str, nn.Module] = field(default_factory=dict)
    verifier: Verifier | None = None
    step: str = "finding the networks"


# --------------------------------------------------------------- checks, logging


def _check_arguments(
    attributes: Any,
    stages: Any,
    on_mismatch: Any,
    max_verify_batches: Any,
    export_formats: Any,
    export_stages: Any,
) -> None:
    if attributes is not None and (
        isinstance(attributes, str) or not all(isinstance(a, str) and a for a in attributes)
    ):
        raise ValueError(
            f"FuseOnExport(attributes={attributes!r}) expects a list of attribute names, e.g. attributes=['net'], "
            f"['{SELF}'] for the LightningModule's own layers, or None to find the networks."
        )
    if stages is not None and (isinstance(stages, str) or any(s not in _STAGES for s in stages)):
        raise ValueError(
            f"FuseOnExport(stages={stages!r}) expects a list drawn from {list(_STAGES)}, e.g. stages=['test']."
        )
    if on_mismatch not in _ON_MISMATCH:
        raise ValueError(f"FuseOnExport(on_mismatch={on_mismatch!r}) expects one of {list(_ON_MISMATCH)}.")
    check_max_batches("FuseOnExport", "max_verify_batches", max_verify_batches)
    exporters = registered_exporters()
    known = [*exporters, CHECKPOINT_FORMAT]  # read now: formats registered after import count too
    if export_formats is not None and (isinstance(export_formats, str) or any(f not in known for f in export_formats)):
        raise ValueError(
            f"FuseOnExport(export_formats={export_formats!r}) expects a list drawn from {known}, "
            "e.g. export_formats=['pt2', 'weights', 'ckpt']."
        )
    for fmt in export_formats or ():
        if fmt == CHECKPOINT_FORMAT:
            continue
        try:  # each format's own check: its extras (and compiler) are installed, before anything is trained
            exporters[fmt].check({})
        except MissingExtraError as err:
            raise MissingExtraError(
                f"FuseOnExport(export_formats={export_formats!r}) cannot write {fmt!r} here: {err} Or drop {fmt!r} "
                "from export_formats."
            ) from err
    if export_stages is not None and (
        isinstance(export_stages, str) or any(s not in _EXPORT_STAGES for s in export_stages)
    ):
        raise ValueError(
            f"FuseOnExport(export_stages={export_stages!r}) expects a list drawn from {list(_EXPORT_STAGES)}, "
            "e.g. export_stages=['fit']."
        )


def _check_export_options(export_options: Any, export_formats: Any, budget: Any, int8: Int8Options | None) -> None:
    """``export_options`` as ``write_artifacts`` takes it, for formats that are written (those int8 is made of
    included), each checked by its format."""
    formats = list(export_formats) if export_formats is not None else ["pt2", "weights", CHECKPOINT_FORMAT]
    formats += [f for f in (int8.formats if int8 is not None else ()) if f not in formats]
    written = [f for f in formats if f != CHECKPOINT_FORMAT]
    if export_options is not None:
        if not isinstance(export_options, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in export_options.items()
        ):
            raise TypeError(
                f"FuseOnExport(export_options={export_options!r}) expects a dict of per-format option dicts, got "
                f"{type(export_options).__name__}. Pass e.g. export_options={{'onnx': {{'optimization_level': "
                "'basic'}}."
            )
        unused = [f for f in export_options if f not in written]
        if unused:
            raise ValueError(
                f"FuseOnExport(export_options={export_options!r}) has options for {unused}, which "
                f"export_formats={written} does not write. Add the format to export_formats or drop its options."
            )
        exporters = registered_exporters()
        for fmt, options in export_options.items():
            try:
                exporters[fmt].check(options)
            except (TypeError, ValueError) as err:
                raise type(err)(f"FuseOnExport(export_options={export_options!r}): {err}") from err
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget) or budget < 0:
        raise ValueError(
            f"FuseOnExport(deploy_latency_budget={budget!r}) expects seconds >= 0 for timing the artifacts, e.g. "
            "deploy_latency_budget=1.0 (0 skips the timing)."
        )


def _takes_example(call: Call, example: Any) -> bool:
    """Whether the network received the forward's input itself, so that the batches' inputs can feed its artifacts."""
    args = example if isinstance(example, tuple) else (example,)
    return not call.kwargs and len(call.args) == len(args) and all(a is b for a, b in zip(call.args, args))


def _layout(tree: Any) -> tuple[Any, list[Any]]:
    """The pytree structure of ``tree`` and the shape of each leaf (its type for non-tensors)."""
    leaves, spec = tree_flatten(tree)
    return spec, [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x) for x in leaves]


class _StandIn(nn.Module):
    """A loaded artifact (a function) in a network's place inside the LightningModule."""

    def __init__(self, runner: Callable[..., Any]) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, *args: Any) -> Any:
        return self.runner(*args)


def _checkpoint_artifact(pl_module: Any, network: Network, checkpoint: DeployCheckpoint) -> Artifact:
    """The deploy checkpoint as an artifact of ``network``: the network of the module reloaded from it."""
    reloaded = checkpoint.module
    assert reloaded is not None  # write_deploy_checkpoint returns the module it reloaded
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


def _deploy_data(reports: dict[str, DeployReport], several: bool) -> dict[str, Any]:
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


def _check_signature(fn: Any, x: Any, where: str) -> None:
    """Raise a ``TypeError`` before training when ``fn`` cannot take ``x`` the way it will be called."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return
    if isinstance(x, tuple):
        shown, how = f"a tuple of {len(x)}", f"{len(x)} positional argument(s)"
        args, kwargs = x, {}
    elif isinstance(x, dict) and x and all(isinstance(k, str) for k in x):
        try:
            signature.bind(**x)
            return
        except TypeError:
            shown, how, args, kwargs = f"a dict with keys {sorted(x)}", "one argument", (x,), {}
    else:
        shown, how, args, kwargs = type(x).__name__, "one argument", (x,), {}
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        owner = getattr(fn, "__self__", fn)
        raise TypeError(
            f"FuseOnExport: {type(owner).__name__}.forward{signature} cannot take the input from {where}: get_input "
            f"returned {shown}, passed as {how} ({err}). Pass get_input=lambda batch: ... returning what forward "
            "takes: a tuple is unpacked into positional arguments, a dict into keyword arguments."
        ) from err


def _leading_inputs(fn: Any, batch: Any, with_target: bool) -> int | None:
    """How many leading elements of a tuple/list ``batch`` ``fn`` takes as its required positional parameters, when
    its first element alone does not bind to ``fn`` (``None`` otherwise, or when they do not bind either). With
    ``with_target``, an element must be left after them for the target.

    Example:
        >>> def forward(x, mask, scale=1.0): ...
        >>> _leading_inputs(forward, (1, 2, 3), with_target=True), _leading_inputs(forward, (1, 2), with_target=True)
        (2, None)
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to bind to
        return None
    try:
        signature.bind(batch[0])
        return None  # the first element fits: the default rule stands
    except TypeError:
        pass
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    count = sum(p.kind in positional and p.default is p.empty for p in signature.parameters.values())
    if count < 2 or count > len(batch) - (1 if with_target else 0):
        return None
    try:
        signature.bind(*batch[:count])
    except TypeError:
        return None
    return count


def _dynamic_batch(wanted: bool, args: tuple[Any, ...]) -> tuple[bool, str]:
    """Whether to export with a dynamic batch dimension, and why not when it was asked for and cannot be."""
    if not wanted:
        return False, ""
    if any(isinstance(a, (list, tuple)) for a in args):
        return False, "its input is a list of tensors, which has no batch dimension to make dynamic"
    sizes = sorted({t.shape[0] for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.dim() > 0})
    if sizes and sizes[0] < 2:
        return False, f"it receives batches of {sizes[0]} here, and a dynamic batch needs an example of 2 or more"
    return True, ""


def _nothing_folded(network: Network, module: nn.Module, report: FusionReport) -> str:
    found = sum(isinstance(m, _BatchNorm) or is_frozen_batch_norm(m) for m in module.modules())
    reasons = sorted({r.reason for r in report.skipped})
    why = "; ".join(reasons[:3]) or "no BatchNorm is called next to a layer it can be folded into"
    return f"'{network.name}': found {found} BatchNorm(s), folded none ({why}); no fused network is used for it"


def _describe(batch: Any) -> str:
    if batch is None:
        return "none"
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return type(batch).__name__


def report_file(stage: str, export_stages: list[str]) -> str:
    """The JSON report's file name for a fusion before ``stage``: ``fuse_report.json`` when that fusion exports
    (the deploy report), ``fuse_report.<stage>.json`` otherwise.

    Example:
        >>> report_file("fit", ["fit"]), report_file("test", ["fit"])
        ('fuse_report.json', 'fuse_report.test.json')
    """
    if stage in export_stages:
        return REPORT_FILE
    return REPORT_FILE.replace(".json", f".{stage}.json")


def _as_given(batch: Any) -> Any:
    return batch


def _no_target(batch: Any) -> None:
    return None


def _callable_name(fn: Any) -> str:
    return "None" if fn is None else getattr(fn, "__qualname__", type(fn).__name__)


def _progress(trainer: Any, batches: Batches) -> Iterable[Any]:
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return batches
    from tqdm.auto import tqdm

    try:
        total: int | None = len(batches)
    except TypeError:
        total = None
    return tqdm(batches, total=total, desc="FuseOnExport: verifying", leave=False, dynamic_ncols=True)


def _fn(trainer: Any) -> str:
    fn = trainer.state.fn
    return str(fn.value if hasattr(fn, "value") else fn)


def _info(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        rank_zero_info(message)


def _warn(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        rank_zero_warn(message)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _jsonable(value: Any) -> Any:
    """Plain data only, so callback state and reports load with ``torch.load(weights_only=True)`` and JSON."""
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)

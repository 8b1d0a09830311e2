"""``FuseOnExport``: the Lightning callback that fuses, verifies and exports at the right moments.

The callback decides *when* things happen and delegates *what* happens: :mod:`.options` checks its arguments,
:mod:`.fusing` fuses and verifies, :mod:`.export` writes and checks the artifacts (through
:func:`fx_lightning.deploy.flow.export_and_verify`), :mod:`.summary` reports, warns and raises, :mod:`.networks`
swaps networks, :mod:`.batches` finds the batches, and every use of Lightning's internals sits in :mod:`.compat`.

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
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback as _LightningCallback
from torch import nn
from torchmetrics import Metric, MetricCollection

from fx_lightning.lightning import compat
from fx_lightning.lightning.batches import InputBinding, check_first_batch, keep_one_shot
from fx_lightning.lightning.export import export, exports_unfolded
from fx_lightning.lightning.fusing import Run, compute_verification, prepare
from fx_lightning.lightning.networks import SELF, Swap, is_fused, networks_of, restore_original
from fx_lightning.lightning.options import OPTION_NAMES, ExportStage, FuseOptions, OnMismatch, Stage
from fx_lightning.lightning.result import FuseResult, FuseState, Outcome
from fx_lightning.lightning.summary import info, raise_or_warn, report_file, trainer_fn, write_report
from fx_lightning.verify.verifier import preserved_rng

try:  # the standalone package is installed next to ``lightning``; users may build either Trainer
    from pytorch_lightning.callbacks import Callback as _PLCallback

    _CALLBACK_BASES: tuple[type, ...] = (_LightningCallback, _PLCallback)
except ImportError:  # pragma: no cover - depends on the environment
    _CALLBACK_BASES = (_LightningCallback,)

__all__ = ["SELF", "FuseOnExport", "FuseResult", "Outcome", "is_fused", "restore_original"]

#: Checkpoints written by earlier versions after ``fit`` carried the unfused weights under this key.
LEGACY_UNFUSED_STATE_KEY = "fx_lightning_unfused_state_dict"


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
        int8: opt-in int8 versions of the float artifacts (:class:`~fx_lightning.deploy.int8.options.Int8Options`, or a
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
        # The constructor's arguments are the options, by name (the signature stays what LightningCLI reads).
        self.options = FuseOptions(**{name: value for name, value in locals().items() if name in OPTION_NAMES})
        #: What a checkpoint keeps of this callback (its fusion history).
        self.state = FuseState()
        self.last_result: FuseResult | None = None
        #: The fused copy of each network from the latest fusion that used them (name -> module).
        self.fused: dict[str, nn.Module] = {}
        self._swap: Swap | None = None
        # When the running validation epoch of fit started, and how long the last one took: the yardstick the
        # summary measures the work after fit against.
        self._epoch_started: float | None = None
        self._epoch_seconds: float | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every fusion's report as plain data, oldest first (kept in checkpoints)."""
        return self.state.history

    @history.setter
    def history(self, value: list[dict[str, Any]]) -> None:
        self.state.history = value

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
            info(trainer, f"FuseOnExport: put the original network(s) back before `trainer.{trainer_fn(trainer)}`.")
        networks_of(pl_module, self.options.attributes)  # raises now on a name that is not a network
        self.options.verify_dataloader = keep_one_shot(self.options.verify_dataloader, self.options.max_verify_batches)
        if self.options.int8 is not None:
            self.options.calibration_dataloader = keep_one_shot(
                self.options.calibration_dataloader, self.options.int8.calibration_batches
            )
        if self.options.fuses_before(stage):
            compat.move_to_end(trainer, self)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs before training, with the module on its device: checks what can be checked on the first
        verification batch (the input and target layout, the forward signature), so that
        a misconfiguration fails now rather than after training."""
        if self.options.fuse_after_fit:
            with preserved_rng(), compat.uncompiled(pl_module):
                check_first_batch(trainer, pl_module, self.options, "fit")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs once training finished normally, with the module still on its device: fuses copies, verifies and
        exports. The user's networks stay in place (``on_fit_end`` would see the module moved to the CPU)."""
        if self.options.fuse_after_fit:
            self._fuse(trainer, pl_module, "fit")

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs in a ``trainer.validate`` loop (not validation inside ``fit``) after every other callback's
        ``on_validation_epoch_start`` (an averaging callback has swapped its weights in): fuses those weights if
        ``"validate"`` is in ``stages``; the fused networks go in per batch. Inside ``fit``, starts the clock."""
        if trainer_fn(trainer) == "fit" and not trainer.sanity_checking:
            self._epoch_started = time.perf_counter()
        if trainer_fn(trainer) == "validate" and self.options.fuses_before("validate"):
            self._fuse(trainer, pl_module, "validate")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after each validation epoch: inside ``fit``, notes how long it took (the summary of the work after
        ``fit`` puts its seconds beside it)."""
        if trainer_fn(trainer) == "fit" and self._epoch_started is not None:
            self._epoch_seconds = time.perf_counter() - self._epoch_started
            self._epoch_started = None

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs before each ``trainer.validate`` step, after the other callbacks' batch hooks: swaps in."""
        if trainer_fn(trainer) == "validate":
            self._swap_in()

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        """Runs after each ``trainer.validate`` step: puts the user's networks back, so that every epoch-level hook
        (an averaging callback swapping its weights back by position) sees the user's networks."""
        if trainer_fn(trainer) == "validate":
            self._swap_out()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after a ``trainer.validate`` loop: forgets the fused networks (the user's are in place)."""
        if trainer_fn(trainer) == "validate":
            self._restore()

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs after Lightning loaded ``ckpt_path`` and after every other callback's ``on_test_epoch_start``:
        fuses the weights in place now; the fused networks go in per batch."""
        if self.options.fuses_before("test"):
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
        if self.options.fuses_before("predict"):
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
        return self._generate_state_key(attributes=self.options.attributes, export_dir=self.options.export_dir)

    def state_dict(self) -> dict[str, Any]:
        """Runs when a checkpoint is written: the callback's own state (:class:`FuseState`), plain data only."""
        return self.state.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Runs when a checkpoint is restored with this callback present: brings back the fusion history of a
        resumed run (a callback that already fused keeps its own, newer history, e.g. for ``ckpt_path="best"``)."""
        if not self.state.history:
            self.state = FuseState.from_dict(state_dict)

    # --------------------------------------------------------------- the decisions

    def _fuse(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Fuse, verify, export and report, inside one error boundary; swap in for a loop when the outcome says so.

        Test/predict loops run under inference mode; tensors created there could never be used for autograd
        again, so everything runs outside it. The global random state is left as found.
        """
        o = self.options
        result = FuseResult(stage=stage, ckpt_path=None if trainer.ckpt_path is None else str(trainer.ckpt_path))
        if stage == "fit":
            result.validation_epoch_seconds = self._epoch_seconds
        with torch.inference_mode(False), torch.no_grad(), preserved_rng(), compat.uncompiled(pl_module) as compiled:
            # trainer.log_dir broadcasts under DDP: every rank asks for it, before anything can fail.
            directory = Path(o.export_dir or (Path(trainer.log_dir or trainer.default_root_dir) / "fused"))
            result.report_path = str(directory / report_file(stage, o.export_stages or []))
            run = Run(trainer, pl_module, stage, result, InputBinding(o.get_input, o.get_target), compiled=compiled)
            failure = None
            try:
                prepare(run, o)
            except Exception as err:  # the error boundary: a finished training run is never lost
                failure = err
            # Every rank votes before the next collective (metric synchronisation), whatever failed locally.
            everyone_ok = bool(trainer.strategy.reduce_boolean_decision(failure is None, all=True))
            if everyone_ok:
                failure = compute_verification(run, o)
            elif failure is None:
                failure = RuntimeError("another process failed; see its warning")
            if failure is not None:
                result.outcome = Outcome.FAILED
                result.error = f"{run.step}: {type(failure).__name__}: {failure}"
            unfolded = result.outcome is Outcome.NOTHING_FOLDED and exports_unfolded(run, o)
            if o.exports_after(stage) and (result.outcome.in_place or unfolded):
                export(run, o, directory)
            if result.outcome.in_place:
                self.fused = {network.name: module for network, module in run.fused.items()}
        self.last_result = result
        self.state.history.append(write_report(trainer, result, o.strict))
        if result.outcome.in_place and stage != "fit":
            self._swap = Swap(pl_module, run.replacements)  # installed around each step of the loop
        raise_or_warn(trainer, result, failure, o)

    def _restore(self) -> bool:
        swap, self._swap = self._swap, None
        return swap.restore() if swap is not None else False

    def _swap_in(self) -> None:
        if self._swap is not None:
            self._swap.install()

    def _swap_out(self) -> None:
        if self._swap is not None:
            self._swap.restore()


def _option(name: str) -> property:
    """The callback's attribute ``name``: the option of that name (read and set through :attr:`options`)."""

    def get(self: FuseOnExport) -> Any:
        return getattr(self.options, name)

    def set_(self: FuseOnExport, value: Any) -> None:
        setattr(self.options, name, value)

    return property(get, set_, doc=f"``FuseOnExport({name}=...)``, as checked by :class:`.options.FuseOptions`.")


for _name in OPTION_NAMES:  # cb.tolerance, cb.export_formats, ...: what users and configs read
    setattr(FuseOnExport, _name, _option(_name))

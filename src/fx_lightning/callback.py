"""``FuseOnExport``: the Lightning callback that fuses, verifies and exports at the right moments.

The callback decides *when* things happen and delegates *what* happens: :func:`fx_lightning.fuse` folds,
:class:`fx_lightning.verify.Verifier` compares the original and fused networks with torchmetrics, and
:mod:`fx_lightning.export` writes the deploy artifacts and the checkpoint form of the fused weights.

When, in one picture (``net`` is the fused child of the LightningModule)::

    fit:      setup -> [original net restored] -> Lightning restores ckpt_path -> train -> on_train_end: fuse
              -> verify -> export -> fused net stays in place (trainer.save_checkpoint now writes folded weights)
    test/predict (and validate if asked):
              setup -> [original net restored] -> Lightning restores ckpt_path -> on_*_start: fuse the weights
              loaded now -> verify -> run the loop with the fused net -> on_*_end: original net put back

One class serves both ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``: it derives from the
``Callback`` class of each namespace that is installed.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback as _LightningCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import Metric, MetricCollection

from fx_lightning.counting import count_kernels
from fx_lightning.export import FORMATS, MissingExtraError, checkpoint_state_dict, export_artifacts
from fx_lightning.pipeline import fuse
from fx_lightning.report import FusionReport
from fx_lightning.tracing import contains_batch_norm
from fx_lightning.verify import VerificationResult, Verifier, default_get_input, default_get_target, eval_mode

try:  # the standalone package is installed next to ``lightning``; users may build either Trainer
    from pytorch_lightning.callbacks import Callback as _PLCallback

    _CALLBACK_BASES: tuple[type, ...] = (_LightningCallback, _PLCallback)
except ImportError:  # pragma: no cover - depends on the environment
    _CALLBACK_BASES = (_LightningCallback,)

Stage = Literal["test", "predict", "validate"]
ExportStage = Literal["fit", "test", "predict", "validate"]
OnMismatch = Literal["revert", "raise", "warn"]

#: Where the original networks live while a fused one is in place: a plain dict on the LightningModule,
#: so it is neither a registered sub-module nor part of ``state_dict()``.
ORIGINALS_ATTR = "_fx_lightning_originals"
#: Checkpoint key holding the unfused weights of the swapped networks (resuming training restores them).
UNFUSED_STATE_KEY = "fx_lightning_unfused_state_dict"
#: The handle of the state-dict hook that writes fused weights in the original layout (see ``_install``).
HOOK_ATTR = "_fx_lightning_state_dict_hook"
REPORT_FILE = "fuse_report.json"

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
_SPAWN_LAUNCHERS = ("_MultiProcessingLauncher",)
_ON_MISMATCH = ("revert", "raise", "warn")
_STAGES = ("test", "predict", "validate")
_EXPORT_STAGES = ("fit", "test", "predict", "validate")


@dataclass
class FuseResult:
    """What one fusion by :class:`FuseOnExport` did: the facts behind the summary, the JSON report and the logs.

    Attributes:
        stage: the Trainer call it ran for: ``"fit"`` (at the end of training), ``"test"``, ``"predict"``
            or ``"validate"``.
        attributes: the LightningModule attributes that were fused.
        reports: the :class:`~fx_lightning.FusionReport` of each attribute.
        outcome: ``"fused"`` (fused network in place), ``"reverted"`` (verification failed, original kept),
            ``"kept despite mismatch"`` (``on_mismatch="warn"``), or ``"failed"`` (the engine raised).
        kernels_before: BatchNorm kernels one forward of the fused attributes ran before fusion.
        kernels_after: the same count after fusion.
        verification: the comparison of original and fused outputs, ``None`` when not verified.
        verify_source: where the verification data came from (``"val"``, ``"test"``, ``"given"``, ...).
        artifacts: format name -> path of each exported, reloaded and checked artifact.
        report_path: the JSON report written on global rank zero.
        seconds: time spent fusing, verifying and exporting.
        ckpt_path: the checkpoint the weights came from, when Lightning restored one.
        error: the engine's or the exporter's error, when one was turned into a warning.
    """

    stage: str
    attributes: list[str]
    reports: dict[str, FusionReport] = field(default_factory=dict)
    outcome: str = "fused"
    kernels_before: int | None = None
    kernels_after: int | None = None
    verification: VerificationResult | None = None
    verify_source: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)
    report_path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    ckpt_path: str | None = None
    error: str = ""

    @property
    def num_folded(self) -> int:
        return sum(r.num_folded for r in self.reports.values())

    def to_dict(self) -> dict[str, Any]:
        """Return plain JSON-serialisable data (also what the callback keeps in checkpoints)."""
        return {
            "stage": self.stage,
            "attributes": list(self.attributes),
            "outcome": self.outcome,
            "num_folded": self.num_folded,
            "kernels_before": self.kernels_before,
            "kernels_after": self.kernels_after,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "verify_source": self.verify_source,
            "artifacts": dict(self.artifacts),
            "report_path": self.report_path,
            "seconds": dict(self.seconds),
            "ckpt_path": self.ckpt_path,
            "error": self.error,
            "reports": {name: report.to_dict() for name, report in self.reports.items()},
        }

    def log_metrics(self, prefix: str = "fuse/") -> dict[str, float]:
        """The figures sent to the Trainer's loggers, as ``{prefix + name: value}``."""
        metrics: dict[str, float] = {
            "folded": float(self.num_folded),
            "skipped": float(sum(r.num_skipped for r in self.reports.values())),
            "untraced": float(sum(len(r.untraced) for r in self.reports.values())),
            "in_place": float(self.outcome in ("fused", "kept despite mismatch")),
        }
        if self.kernels_before is not None and self.kernels_after is not None:
            metrics["kernels_removed"] = float(self.kernels_before - self.kernels_after)
        if self.verification is not None:
            v = self.verification
            metrics |= {"passed": float(v.passed), "max_abs_diff": float(v.max_abs_diff)}
            if v.top1_agreement is not None:
                metrics["top1_agreement"] = float(v.top1_agreement)
            metrics |= {f"{k}_original": float(val) for k, val in v.metric_original.items()}
            metrics |= {f"{k}_fused": float(val) for k, val in v.metric_fused.items()}
        metrics |= {f"seconds_{k}": float(val) for k, val in self.seconds.items()}
        return {prefix + k: val for k, val in metrics.items() if math.isfinite(val)}

    def __str__(self) -> str:
        where = "end of fit" if self.stage == "fit" else f"before {self.stage}"
        lines = [f"FuseOnExport ({where}): {', '.join(self.attributes)} -> {self.outcome}"]
        if self.ckpt_path:
            lines.append(f"  weights from checkpoint: {self.ckpt_path}")
        for report in self.reports.values():
            lines += ["  " + line for line in str(report).splitlines()]
        if self.kernels_before is not None and self.kernels_after is not None:
            lines.append(
                f"  BatchNorm kernels per forward: {self.kernels_before} -> {self.kernels_after} "
                f"({self.kernels_before - self.kernels_after} removed)"
            )
        if self.verification is not None:
            v = self.verification
            after = v.metric_fused
            figures = ", ".join(f"{k} {x:.4f} -> {after.get(k, math.nan):.4f}" for k, x in v.metric_original.items())
            lines.append(
                f"  verification on {v.num_samples} samples ({self.verify_source}): {figures}; "
                f"max abs diff {v.max_abs_diff:.3g}{_agreement(v)}, tolerance {v.tolerance:g} -> "
                f"{'passed' if v.passed else 'FAILED'}"
            )
            lines += [f"  note: {note}" for note in v.notes]
        elif self.verify_source:
            lines.append(f"  verification: {self.verify_source}")
        if self.seconds:
            lines.append("  time: " + ", ".join(f"{k} {s:.2f}s" for k, s in self.seconds.items()))
        for fmt, path in self.artifacts.items():
            lines.append(f"  artifact ({fmt}): {path}")
        if self.report_path:
            lines.append(f"  report: {self.report_path}")
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


class FuseOnExport(*_CALLBACK_BASES):  # type: ignore[misc]
    """Fuse BatchNorm into the LightningModule's networks after training and for test/predict, verify, export.

    At the end of a successful ``fit``, and before ``test``/``predict`` (and ``validate`` if asked), the
    chosen children of the LightningModule are fused with :func:`fx_lightning.fuse` from the weights loaded at
    that moment (so ``trainer.test(ckpt_path="best")`` tests the best weights, fused), compared with the
    original on the validation data using torchmetrics, and swapped in. The original is put back after each
    test/predict/validate loop and before Lightning restores any checkpoint, so Lightning always loads into
    the original architecture. After ``fit`` the fused network stays in place: ``trainer.save_checkpoint``
    then writes the folded weights in the original layout, which ``MyModule.load_from_checkpoint(path)``
    loads strictly; the unfused weights travel in the same file so that training resumes exactly.

    Args:
        attributes: names (dotted paths allowed) of the LightningModule's networks to fuse. ``None`` fuses
            every direct child that contains a BatchNorm; the LightningModule itself is never traced.
        stages: the Trainer calls, besides the end of ``fit``, before which the networks are fused:
            any of ``"test"``, ``"predict"``, ``"validate"``. ``None`` means ``["test", "predict"]``.
        fuse_after_fit: fuse, verify and export at the end of a successful ``fit``.
        verify: compare the original and fused networks before keeping the fused one.
        metric: the torchmetrics metric (or ``MetricCollection``) computed for both networks. ``None`` infers a
            multiclass accuracy from the outputs and targets. From YAML, give it with ``class_path``.
        tolerance: verification passes when ``|metric_fused - metric_original| <= tolerance`` for each metric.
        on_mismatch: what to do when verification fails: ``"revert"`` to the original network (with a
            warning), ``"raise"`` a ``RuntimeError``, or ``"warn"`` and keep the fused network.
        max_verify_batches: verify on at most this many batches; ``None`` uses the whole dataloader.
        verify_dataloader: data to verify on instead of the validation dataloader (set from Python).
        get_input: takes a batch and returns the LightningModule's forward input (a tuple is unpacked into
            positional arguments). ``None`` takes the first element of tuple/list batches, or the
            ``"input"``/``"x"``/``"image"`` entry of dict batches.
        get_target: takes a batch and returns the targets for ``metric``; ``None`` takes the second element
            of tuple/list batches, or the ``"target"``/``"label"``/``"y"`` entry of dict batches.
        example_input: the forward input used for shape propagation, kernel counts and export; ``None`` takes
            it from the first verification batch.
        export_dir: directory for the artifacts and the JSON report; ``None`` uses ``<trainer.log_dir>/fused``.
        export_formats: artifacts to write: ``"pt2"`` (``torch.export``), ``"weights"`` (a state dict as
            ``.safetensors``, or ``.pt`` for ``torch.load(weights_only=True)`` without safetensors), ``"onnx"``
            (needs ``pip install "fx-lightning[onnx]"``). ``None`` means ``["pt2", "weights"]``; ``[]`` writes
            only the report.
        export_stages: the Trainer calls after whose fusion the artifacts are written: any of ``"fit"``,
            ``"test"``, ``"predict"``, ``"validate"``. ``None`` means ``["fit", "test"]``.
        dynamic_batch: export ``pt2``/``onnx`` with a dynamic batch dimension (checked on a second batch size);
            ``False`` fixes the batch size of the example input.
        passes: the fusion passes to run (see :func:`fx_lightning.registered_passes`); ``None`` runs all.
        strict: raise instead of warning when the engine or the exporter fails, and on a failed verification
            whatever ``on_mismatch`` says.

    Raises:
        ValueError: if an argument is out of its range.
        TypeError: if ``metric`` is not a torchmetrics ``Metric`` or ``MetricCollection``.
        fx_lightning.export.MissingExtraError: if ``"onnx"`` is asked for without the ``onnx`` extra installed.

    Example::

        from lightning.pytorch import Trainer
        from fx_lightning import FuseOnExport

        trainer = Trainer(max_epochs=5, callbacks=[FuseOnExport(tolerance=1e-3)])
        trainer.fit(model, datamodule=dm)   # ends with model.net fused, verified, exported
        trainer.test(datamodule=dm)         # best checkpoint, fused again, tested; original put back
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
        dynamic_batch: bool = True,
        passes: list[str] | None = None,
        strict: bool = False,
    ) -> None:
        _check_arguments(
            attributes, stages, metric, tolerance, on_mismatch, max_verify_batches, export_formats, export_stages
        )
        self.attributes = list(attributes) if attributes is not None else None
        self.stages: list[str] = list(stages) if stages is not None else ["test", "predict"]
        self.fuse_after_fit = fuse_after_fit
        self.verify = verify
        self.metric = metric
        self.tolerance = float(tolerance)
        self.on_mismatch = on_mismatch
        self.max_verify_batches = max_verify_batches
        self.verify_dataloader = verify_dataloader
        self.get_input = get_input
        self.get_target = get_target
        self.example_input = example_input
        self.export_dir = export_dir
        self.export_formats: list[str] = list(export_formats) if export_formats is not None else ["pt2", "weights"]
        self.export_stages: list[str] = list(export_stages) if export_stages is not None else ["fit", "test"]
        self.dynamic_batch = dynamic_batch
        self.passes = list(passes) if passes is not None else None
        self.strict = strict
        self.last_result: FuseResult | None = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Runs at the start of every Trainer call, before Lightning restores ``ckpt_path``: rejects strategies
        that cannot work, puts the original networks back so the checkpoint loads into them, and checks the
        attribute names early."""
        _check_strategy(trainer)
        if restore_original(pl_module):
            _info(trainer, f"FuseOnExport: put the original network(s) back before `trainer.{_fn(trainer)}`.")
        self._resolve_attributes(pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs once training finished normally, with the module still on its device: fuses, verifies and
        exports, and leaves the fused network in place (``on_fit_end`` would see it moved to the CPU)."""
        if self.fuse_after_fit:
            self._fuse(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs before a ``trainer.validate`` loop (not validation inside ``fit``): fuses if ``"validate"`` is
        in ``stages``."""
        if _fn(trainer) == "validate" and "validate" in self.stages:
            self._fuse(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after a ``trainer.validate`` loop: puts the original network back."""
        if _fn(trainer) == "validate":
            restore_original(pl_module)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs after Lightning loaded ``ckpt_path`` and before the first test batch: fuses those weights."""
        if "test" in self.stages:
            self._fuse(trainer, pl_module, "test")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after the test loop: puts the original network back."""
        restore_original(pl_module)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Runs after Lightning loaded ``ckpt_path`` and before the first predict batch: fuses those weights."""
        if "predict" in self.stages:
            self._fuse(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Runs after the predict loop: puts the original network back."""
        restore_original(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Runs when any Trainer call raises: puts the original network back so nothing half-fused remains."""
        restore_original(pl_module)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Runs when Lightning writes a full checkpoint. Checkpoints written during training are left unchanged.
        While a fused network is in place, ``state_dict`` already holds its folded weights in the original
        layout (a state-dict hook on the module writes them, for ``weights_only`` saves too); the unfused
        weights are added under a separate key so that training can resume from the original network."""
        originals = _originals(pl_module)
        if originals:
            checkpoint[UNFUSED_STATE_KEY] = {
                f"{name}.{k}": v.detach().clone()
                for name, original in originals.items()
                for k, v in original.state_dict().items()
            }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Runs after Lightning loaded a checkpoint's ``state_dict`` into the (original) module: when the file
        was written while a fused network was in place, loads the unfused weights it carries, so training
        resumes from the original network rather than from BatchNorms set to the identity."""
        unfused = checkpoint.get(UNFUSED_STATE_KEY)
        if unfused:
            state = dict(checkpoint["state_dict"]) | dict(unfused)
            pl_module.load_state_dict(state, strict=pl_module.strict_loading)

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
        # Test/predict loops run under inference mode; tensors created there could never be used for autograd
        # again, so the fused weights and the verification run outside it.
        with torch.inference_mode(False), torch.no_grad():
            self._fuse_impl(trainer, pl_module, stage)

    def _fuse_impl(self, trainer: Any, pl_module: Any, stage: str) -> None:
        names = self._resolve_attributes(pl_module)
        if not names:
            _warn(
                trainer,
                f"FuseOnExport found no BatchNorm in the direct children of {type(pl_module).__name__}; nothing "
                "to fuse. Name the network with FuseOnExport(attributes=['net']) if it is nested deeper.",
            )
            return
        result = FuseResult(stage=stage, attributes=names, ckpt_path=_str_or_none(trainer.ckpt_path))
        originals = {name: _get(pl_module, name) for name in names}
        source, batches = self._verification_data(trainer, stage)
        first_batch, batches = _peek(batches)
        example = self._example_input(trainer, pl_module, first_batch)
        child_inputs = _capture_inputs(trainer, pl_module, originals, example, names) if example is not None else {}

        start = time.perf_counter()
        fused: dict[str, nn.Module] = {}
        try:
            for name, original in originals.items():
                fused[name] = fuse(original, example_inputs=child_inputs.get(name), passes=self.passes)
                result.reports[name] = fused[name].fusion_report
            if child_inputs:
                result.kernels_before, result.kernels_after = _count(trainer, originals, fused, child_inputs)
        except Exception as err:
            result.seconds["fuse"] = time.perf_counter() - start
            self._engine_failed(trainer, result, err)
            return
        result.seconds["fuse"] = time.perf_counter() - start

        passed = True
        if self.verify and batches is not None:
            start = time.perf_counter()
            try:
                result.verification = self._run_verification(trainer, pl_module, originals, fused, batches)
            except Exception as err:  # e.g. the fused network returns another shape: never crash the run for it
                result.seconds["verify"] = time.perf_counter() - start
                self._engine_failed(trainer, result, err, what="the verification pass")
                return
            result.verify_source = source
            result.seconds["verify"] = time.perf_counter() - start
            # Every rank sees the same synchronised metric; the explicit vote also covers a rank that failed.
            passed = bool(trainer.strategy.reduce_boolean_decision(result.verification.passed, all=True))
        elif self.verify:
            result.verify_source = "skipped: no validation data (give verify_dataloader=...)"
            _warn(trainer, f"FuseOnExport could not verify the fused network before {stage}: no validation data.")
        else:
            result.verify_source = "skipped: verify=False"

        if passed:
            _install(pl_module, fused, originals)
        else:
            result.outcome = self._mismatch_outcome()
            if result.outcome == "kept despite mismatch":
                _install(pl_module, fused, originals)

        if stage in self.export_stages and result.outcome != "reverted":
            self._export(trainer, fused, child_inputs, result)
        self._report(trainer, result)
        if not passed:
            self._mismatch(trainer, result)

    def _run_verification(
        self,
        trainer: Any,
        pl_module: Any,
        originals: dict[str, nn.Module],
        fused: dict[str, nn.Module],
        batches: Iterable[Any],
    ) -> VerificationResult:
        verifier = Verifier(
            metric=copy.deepcopy(self.metric) if self.metric is not None else None,
            tolerance=self.tolerance,
            get_input=self.get_input or default_get_input,
            get_target=self.get_target or default_get_target,
        ).to(pl_module.device)
        world, rank = trainer.world_size, trainer.global_rank
        total = _num_batches(batches, self.max_verify_batches)
        progress = _progress(trainer, batches, total)

        def run_with(modules: dict[str, nn.Module]) -> Callable[..., Any]:
            def run(*args: Any) -> Any:
                with _installed(pl_module, modules):
                    return _forward(trainer, pl_module, args[0] if len(args) == 1 else args, list(modules))

            return run

        with eval_mode(pl_module):
            for index, batch in enumerate(progress):
                if self.max_verify_batches is not None and index >= self.max_verify_batches:
                    break
                # Each rank takes every world-th batch of the unsharded data: an exact partition, so the
                # synchronised metric equals the single-process one.
                if index % world != rank:
                    continue
                verifier.update(run_with(originals), run_with(fused), _to_device(trainer, pl_module, batch))
        if hasattr(progress, "close"):
            progress.close()
        return verifier.compute()

    def _export(
        self, trainer: Any, fused: dict[str, nn.Module], child_inputs: dict[str, tuple[Any, ...]], result: FuseResult
    ) -> None:
        # trainer.log_dir broadcasts under DDP: every rank must ask for it, even though only rank zero writes.
        directory = Path(self.export_dir) if self.export_dir else Path(trainer.log_dir or trainer.default_root_dir)
        if not self.export_dir:
            directory = directory / "fused"
        status: dict[str, Any] = {"artifacts": {}, "error": "", "seconds": 0.0}
        if trainer.is_global_zero:
            start = time.perf_counter()
            directory.mkdir(parents=True, exist_ok=True)
            try:
                for name, module in fused.items():
                    if self.export_formats and name not in child_inputs:
                        raise RuntimeError(
                            f"no example input reached `{name}` (it was not called by the LightningModule's forward); "
                            "give FuseOnExport(example_input=...) or name the network with attributes=[...]"
                        )
                    if not self.export_formats:
                        continue
                    paths = export_artifacts(
                        module,
                        child_inputs[name],
                        directory,
                        formats=tuple(self.export_formats),
                        name=_file_name(name),
                        dynamic_batch=self.dynamic_batch,
                    )
                    prefix = "" if len(fused) == 1 else f"{name}."
                    status["artifacts"] |= {prefix + fmt: str(path) for fmt, path in paths.items()}
            except Exception as err:
                status["error"] = f"export failed: {type(err).__name__}: {err}"
            status["report_path"] = str(directory / REPORT_FILE)
            status["seconds"] = time.perf_counter() - start
        status = trainer.strategy.broadcast(status, src=0)
        result.artifacts = status["artifacts"]
        result.report_path = status.get("report_path")
        result.seconds["export"] = status["seconds"]
        if status["error"]:
            result.error = status["error"]
            if self.strict:
                raise RuntimeError(
                    f"FuseOnExport(strict=True) could not export the fused network to {directory}: {status['error']}. "
                    "Fix the cause, choose other export_formats, or set strict=False to continue with a warning."
                )
            _warn(trainer, f"FuseOnExport: {status['error']}; the fused network is in place, artifacts are missing.")

    def _report(self, trainer: Any, result: FuseResult) -> None:
        self.last_result = result
        self.history.append(_jsonable(result.to_dict()))
        metrics = result.log_metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        if trainer.is_global_zero and result.report_path:
            path = Path(result.report_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_jsonable(result.to_dict()), indent=2) + "\n")
        _info(trainer, str(result))

    def _engine_failed(self, trainer: Any, result: FuseResult, err: Exception, what: str = "fx_lightning.fuse") -> None:
        result.outcome = "failed"
        result.error = f"{type(err).__name__}: {err}"
        if self.strict:
            raise RuntimeError(
                f"FuseOnExport(strict=True): {what} failed on {result.attributes} before {result.stage}: "
                f"{result.error}. The original network is in place. Set strict=False to continue with a warning, "
                "or name other attributes."
            ) from err
        self._report(trainer, result)
        _warn(
            trainer,
            f"FuseOnExport: {what} failed on {result.attributes} ({result.error}); continuing with the original "
            "network. Set strict=True to raise instead.",
        )

    def _mismatch_outcome(self) -> str:
        if self.on_mismatch == "warn" and not self.strict:
            return "kept despite mismatch"
        return "reverted"

    def _mismatch(self, trainer: Any, result: FuseResult) -> None:
        v = result.verification
        assert v is not None  # only called after a verification
        diffs = ", ".join(
            f"{k} {v.metric_original[k]:.6g} (original) vs {v.metric_fused.get(k, float('nan')):.6g} (fused)"
            for k in v.metric_original
        )
        detail = (
            f"the fused network failed verification before {result.stage}: {diffs}, tolerance {v.tolerance:g}, "
            f"max abs diff {v.max_abs_diff:.3g}{_agreement(v)}"
        )
        if self.strict or self.on_mismatch == "raise":
            mode = "strict=True" if self.strict else "on_mismatch='raise'"
            raise RuntimeError(
                f"FuseOnExport({mode}): {detail}. The original network was put back. Check the fusion report, "
                "raise `tolerance` if the difference is expected, or use on_mismatch='revert' to continue."
            )
        if self.on_mismatch == "warn":
            _warn(trainer, f"FuseOnExport(on_mismatch='warn'): {detail}. Keeping the fused network anyway.")
        else:
            _warn(trainer, f"FuseOnExport(on_mismatch='revert'): {detail}. Reverted to the original network.")

    # -------------------------------------------------------------- helpers

    def _resolve_attributes(self, pl_module: nn.Module) -> list[str]:
        if self.attributes is None:
            return [name for name, child in pl_module.named_children() if contains_batch_norm(child)]
        for name in self.attributes:
            try:
                value = _get(pl_module, name)
            except AttributeError as err:
                children = [n for n, _ in pl_module.named_children()]
                raise ValueError(
                    f"FuseOnExport(attributes={self.attributes!r}): {type(pl_module).__name__} has no attribute "
                    f"{name!r}. Its direct children are {children}; name one of them, or attributes=None to fuse "
                    "every child that contains a BatchNorm."
                ) from err
            if not isinstance(value, nn.Module):
                raise TypeError(
                    f"FuseOnExport(attributes={self.attributes!r}): {type(pl_module).__name__}.{name} is a "
                    f"{type(value).__name__}, expected a torch.nn.Module. Name the network attribute, e.g. 'net'."
                )
        return list(self.attributes)

    def _verification_data(self, trainer: Any, stage: str) -> tuple[str, Iterable[Any] | None]:
        if self.verify_dataloader is not None:
            return "given", self.verify_dataloader
        loops = [("val", trainer.fit_loop.epoch_loop.val_loop)]
        own = {"test": "test_loop", "predict": "predict_loop", "validate": "validate_loop"}.get(stage)
        if own is not None:
            loops.append((stage, getattr(trainer, own)))
        for name, loop in loops:
            source = getattr(loop, "_data_source", None)
            if source is None or not source.is_defined():
                continue
            try:
                loaders = source.dataloader()
            except Exception:  # e.g. a datamodule that builds the val split only for "fit": try the next source
                continue
            if loaders is not None:
                return name, _chain(loaders)
        return "none", None

    def _example_input(self, trainer: Any, pl_module: Any, first_batch: Any) -> Any:
        if self.example_input is not None:
            return _to_device(trainer, pl_module, self.example_input)
        if first_batch is None:
            return None
        return self._input_of(_to_device(trainer, pl_module, first_batch))

    def _input_of(self, batch: Any) -> Any:
        return (self.get_input or default_get_input)(batch)


# ---------------------------------------------------------------------- swapping


def restore_original(pl_module: nn.Module) -> bool:
    """Put the original networks back into ``pl_module`` if fused ones are in place.

    Works whichever :class:`FuseOnExport` instance fused them (the originals are kept on the module).

    Args:
        pl_module: a LightningModule (any ``nn.Module``) that :class:`FuseOnExport` may have fused.

    Returns:
        Whether anything was put back.
    """
    originals = pl_module.__dict__.pop(ORIGINALS_ATTR, None)
    handle = pl_module.__dict__.pop(HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    if not originals:
        return False
    for name, original in originals.items():
        current = _get(pl_module, name)
        _align(original, current)
        _set(pl_module, name, original)
    return True


def is_fused(pl_module: nn.Module) -> bool:
    """Whether :class:`FuseOnExport` left fused networks in place in ``pl_module``."""
    return bool(_originals(pl_module))


def _originals(pl_module: nn.Module) -> dict[str, nn.Module]:
    return pl_module.__dict__.get(ORIGINALS_ATTR) or {}


def _install(pl_module: nn.Module, fused: dict[str, nn.Module], originals: dict[str, nn.Module]) -> None:
    for name, module in fused.items():
        _set(pl_module, name, module)
    pl_module.__dict__[ORIGINALS_ATTR] = dict(originals)
    if HOOK_ATTR not in pl_module.__dict__:
        pl_module.__dict__[HOOK_ATTR] = pl_module.register_state_dict_post_hook(_folded_state_dict_hook)


def _folded_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Write a fused network's weights in its original layout, so ``state_dict()`` of the LightningModule (and so
    every checkpoint) loads strictly into the user's own class and computes what the fused network computes."""
    originals = _originals(module)
    folded: dict[str, dict[str, torch.Tensor]] = {}
    for name, original in originals.items():
        fused = _get(module, name)
        if fused is not original:
            _align(original, fused)
            values = checkpoint_state_dict(original, fused)
            folded[f"{prefix}{name}."] = {f"{prefix}{name}.{k}": values[k] for k in original.state_dict()}
    if not folded:
        return
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        owner = next((p for p in folded if key.startswith(p)), None)
        if owner is None:
            state_dict[key] = value
        elif folded[owner]:
            # The first key of a fused network: emit its whole folded state in the original order.
            state_dict.update(folded[owner])
            folded[owner] = {}
    for rest in folded.values():  # a fused network without any state of its own
        state_dict.update(rest)


@contextlib.contextmanager
def _installed(pl_module: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily set ``modules`` at their attribute paths, whatever is in place now."""
    before = {name: _get(pl_module, name) for name in modules}
    try:
        for name, module in modules.items():
            _set(pl_module, name, module)
        yield
    finally:
        for name, module in before.items():
            _set(pl_module, name, module)


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = _get(root, parent_path) if parent_path else root
    setattr(parent, attr, module)


def _align(original: nn.Module, current: nn.Module) -> None:
    """Move ``original`` to the device of ``current``: the Trainer moves only the registered (fused) network."""
    current_tensor = next(itertools.chain(current.parameters(), current.buffers()), None)
    original_tensor = next(itertools.chain(original.parameters(), original.buffers()), None)
    if current_tensor is not None and original_tensor is not None and current_tensor.device != original_tensor.device:
        original.to(current_tensor.device)


# ------------------------------------------------------------------ running data


def _to_device(trainer: Any, pl_module: Any, batch: Any) -> Any:
    """Prepare a batch exactly as Lightning's loops do: precision conversion, transfer hooks, device."""
    batch = trainer.precision_plugin.convert_input(batch)
    if hasattr(pl_module, "_on_before_batch_transfer"):
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def _call(module: Callable[..., Any], x: Any) -> Any:
    return module(*x) if isinstance(x, tuple) else module(x)


def _forward(trainer: Any, pl_module: Any, x: Any, names: list[str]) -> Any:
    with trainer.precision_plugin.forward_context():
        if _overrides_forward(pl_module):
            return _call(pl_module, x)
        if len(names) == 1:
            return _call(_get(pl_module, names[0]), x)
    raise ValueError(
        f"FuseOnExport(attributes={names!r}) needs {type(pl_module).__name__}.forward to compare the original and "
        "fused networks: define forward(), or fuse a single network with attributes=['net']."
    )


def _overrides_forward(pl_module: Any) -> bool:
    for cls in type(pl_module).__mro__:
        if "forward" in cls.__dict__:
            return not cls.__module__.startswith(("lightning.", "pytorch_lightning.", "torch."))
    return False


def _capture_inputs(
    trainer: Any, pl_module: Any, originals: dict[str, nn.Module], example: Any, names: list[str]
) -> dict[str, tuple[Any, ...]]:
    """Run one forward and record the positional inputs each network receives (its first call)."""
    captured: dict[str, tuple[Any, ...]] = {}
    handles = []
    for name, module in originals.items():

        def hook(_module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            captured.setdefault(name, tuple(args))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with eval_mode(pl_module), _installed(pl_module, originals):
            _forward(trainer, pl_module, example, names)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _count(
    trainer: Any, originals: dict[str, nn.Module], fused: dict[str, nn.Module], inputs: dict[str, tuple[Any, ...]]
) -> tuple[int, int]:
    before = after = 0
    with trainer.precision_plugin.forward_context():
        for name, args in inputs.items():
            with eval_mode(originals[name]):
                before += count_kernels(originals[name], *args)
            after += count_kernels(fused[name], *args)
    return before, after


def _chain(loaders: Any) -> Iterable[Any]:
    """One iterable over a dataloader or a list/tuple/dict of dataloaders (Lightning's multi-loader forms)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return _Chained(list(loaders))
    return loaders


class _Chained:
    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(self.loaders)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)


def _peek(batches: Iterable[Any] | None) -> tuple[Any, Iterable[Any] | None]:
    """Return the first batch and an iterable that still yields every batch (fresh iteration of the loader)."""
    if batches is None:
        return None, None
    for batch in batches:
        return batch, batches
    return None, None


def _num_batches(batches: Iterable[Any], limit: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)


def _progress(trainer: Any, batches: Iterable[Any], total: int | None) -> Iterable[Any]:
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc="FuseOnExport: verifying", leave=False, dynamic_ncols=True)


# --------------------------------------------------------------- checks, logging


def _check_arguments(
    attributes: Any,
    stages: Any,
    metric: Any,
    tolerance: Any,
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
            "or None to fuse every child that contains a BatchNorm."
        )
    if stages is not None and (isinstance(stages, str) or any(s not in _STAGES for s in stages)):
        raise ValueError(
            f"FuseOnExport(stages={stages!r}) expects a list drawn from {list(_STAGES)}, e.g. stages=['test']."
        )
    if metric is not None and not isinstance(metric, (Metric, MetricCollection)):
        raise TypeError(
            f"FuseOnExport(metric={metric!r}) expects a torchmetrics Metric or MetricCollection, got "
            f"{type(metric).__name__}. Pass e.g. torchmetrics.classification.MulticlassAccuracy(num_classes=10)."
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or math.isnan(tolerance):
        raise ValueError(f"FuseOnExport(tolerance={tolerance!r}) expects a number, e.g. tolerance=1e-3.")
    if on_mismatch not in _ON_MISMATCH:
        raise ValueError(f"FuseOnExport(on_mismatch={on_mismatch!r}) expects one of {list(_ON_MISMATCH)}.")
    if max_verify_batches is not None and (
        isinstance(max_verify_batches, bool) or not isinstance(max_verify_batches, int) or max_verify_batches < 1
    ):
        raise ValueError(
            f"FuseOnExport(max_verify_batches={max_verify_batches!r}) expects a positive integer or None (all batches)."
        )
    if export_formats is not None and (
        isinstance(export_formats, str) or any(f not in FORMATS for f in export_formats)
    ):
        raise ValueError(
            f"FuseOnExport(export_formats={export_formats!r}) expects a list drawn from {list(FORMATS)}, "
            "e.g. export_formats=['pt2', 'weights']."
        )
    missing = _missing_onnx_modules() if export_formats is not None and "onnx" in export_formats else []
    if missing:
        raise MissingExtraError(
            f"FuseOnExport(export_formats={export_formats!r}) needs {', '.join(missing)} for ONNX export. Install "
            "the extra with `pip install \"fx-lightning[onnx]\"`, or drop 'onnx' from export_formats."
        )
    if export_stages is not None and (
        isinstance(export_stages, str) or any(s not in _EXPORT_STAGES for s in export_stages)
    ):
        raise ValueError(
            f"FuseOnExport(export_stages={export_stages!r}) expects a list drawn from {list(_EXPORT_STAGES)}, "
            "e.g. export_stages=['fit']."
        )


def _missing_onnx_modules() -> list[str]:
    return [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]


def _check_strategy(trainer: Any) -> None:
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    unsupported = names.intersection(_UNSUPPORTED_STRATEGIES)
    if unsupported:
        raise ValueError(
            f"FuseOnExport does not support Trainer(strategy={type(strategy).__name__}) yet: sharded parameters "
            "cannot be folded in place. Train with strategy='ddp' (or a single device), or fuse the saved "
            "checkpoint afterwards with fx_lightning.fuse."
        )
    launcher = getattr(strategy, "launcher", None)
    if launcher is not None and {cls.__name__ for cls in type(launcher).__mro__}.intersection(_SPAWN_LAUNCHERS):
        raise ValueError(
            f"FuseOnExport does not support spawn-based strategies (Trainer(strategy={type(strategy).__name__}) with "
            f"start method {getattr(launcher, '_start_method', '?')!r}): the main process reloads the workers' "
            "weights with strict=False, which would silently drop the fused weights. Use strategy='ddp' from a "
            "script (each process runs the script), or a single device."
        )


def _fn(trainer: Any) -> str:
    fn = trainer.state.fn
    return str(fn.value if hasattr(fn, "value") else fn)


def _info(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        rank_zero_info(message)


def _warn(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        rank_zero_warn(message)


def _agreement(v: VerificationResult) -> str:
    return "" if v.top1_agreement is None else f", top-1 agreement {100 * v.top1_agreement:.2f}%"


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _file_name(attribute: str) -> str:
    return attribute.replace(".", "_")


def _jsonable(value: Any) -> Any:
    """Plain data only, so callback state and reports load with ``torch.load(weights_only=True)`` and JSON."""
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

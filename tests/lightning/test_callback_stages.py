"""FuseOnExport at every stage beside Lightning's own machinery: callbacks that read or rewrite parameters at
epoch-level hooks (weight averaging, SWA, pruning, backbone fine-tuning) in either order, a ``torch.compile``d
LightningModule, and a forward with several inputs. The loops run the fused network (0 BatchNorm kernels per
step) and their metrics equal those of the same run without FuseOnExport."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    EMAWeightAveraging,
    ModelPruning,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader

from fx_lightning import FuseOnExport
from fx_lightning.fusion.counting import counting_ops
from fx_lightning.lightning.callback import Outcome, is_fused

#: The fused and unfused loops may differ by rounding only (float32 folding of three Conv-BN pairs).
RELATIVE = 1e-4
#: Accuracy over 64 samples: one changed prediction is 1/64, far above the callback's tolerance.
TOLERANCE = 1e-3
STAGES = ("validate", "test", "predict")

OTHERS: dict[str, Callable[[], pl.Callback]] = {
    "ema": lambda: EMAWeightAveraging(decay=0.5),
    "swa": lambda: StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1),
    "pruning": lambda: ModelPruning("l1_unstructured", amount=0.3, verbose=0),
    "backbone": lambda: BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01),
}
#: The whole matrix takes minutes on two shared cores: these cases run by default, the rest with ``-m slow``.
DEFAULT_CASES = {("ema", True), ("ema", False), ("swa", False), ("pruning", True), ("backbone", False)}


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Classifier(pl.LightningModule):
    """Three Conv-BN-ReLU blocks as ``backbone`` (for BackboneFinetuning) and a linear ``head``; the steps log a
    loss and an accuracy, predict returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(block(1, 4), nn.MaxPool2d(2), block(4, 8), block(8, 8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def _evaluate(self, batch: Any, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y))
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The head alone at first: BackboneFinetuning adds the backbone's group when it unfreezes it.
        return torch.optim.Adam(self.head.parameters() if self.backbone_frozen() else self.parameters(), lr=0.05)

    def backbone_frozen(self) -> bool:
        return not all(p.requires_grad for p in self.backbone.parameters())


class KernelProbe(pl.Callback):
    """Counts the BatchNorm kernels each evaluation/predict step runs: from its batch-start hook to its batch-end
    hook, around the step (FuseOnExport moves itself last, so its swaps happen inside this window)."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []
        self._stack: contextlib.ExitStack | None = None
        self._counts: Any = None

    def _start(self, *args: Any) -> None:
        self._stack = contextlib.ExitStack()
        self._counts = self._stack.enter_context(counting_ops("batch_norm"))

    def _end(self, *args: Any) -> None:
        assert self._stack is not None
        self._stack.close()
        self.per_batch.append(sum(self._counts.values()))

    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _start
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _end


def loader(seed: int, n: int = 64, batch_size: int = 32, inputs: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 1, 8, 8, generator=gen) for _ in range(inputs)]
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(list(zip(*xs, y)), batch_size=batch_size)


def make_trainer(root: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 2,
        "limit_train_batches": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    return pl.Trainer(**(defaults | kwargs), callbacks=callbacks)


def run_stage(trainer: pl.Trainer, model: Any, stage: str) -> dict[str, Any]:
    """The stage's figures: the logged metrics, or the predicted logits."""
    if stage == "predict":
        return {"logits": torch.cat(trainer.predict(model, dataloaders=loader(seed=3)))}
    run = trainer.validate if stage == "validate" else trainer.test
    return dict(run(model, dataloaders=loader(seed=2), verbose=False)[0])


def perturb(model: nn.Module) -> None:
    """Move the trained weights away from the averaged ones, so that a stage that fuses before an averaging callback
    swaps its weights in would fuse the wrong ones."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def fit_then_stages(other: str, fuse: FuseOnExport | None, first: bool, root: Path) -> tuple[dict[str, Any], Any]:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    probe = KernelProbe()
    callbacks: list[Any] = [probe, OTHERS[other]()]
    if fuse is not None:
        callbacks.insert(1 if first else 2, fuse)
    trainer = make_trainer(root, callbacks)
    trainer.fit(model, train_dataloaders=loader(seed=0), val_dataloaders=loader(seed=1))
    perturb(model)
    figures: dict[str, Any] = {}
    for stage in STAGES:
        probe.per_batch = []
        figures[stage] = run_stage(trainer, model, stage)
        figures[stage]["kernels"] = probe.per_batch
    return figures, model


def assert_same_figures(stage: str, fused: dict[str, Any], reference: dict[str, Any]) -> None:
    if stage == "predict":
        expected = reference["logits"]
        assert float((fused["logits"] - expected).abs().max() / expected.abs().max()) <= RELATIVE, stage
        return
    for name in (f"{'val' if stage == 'validate' else 'test'}_loss",):
        assert abs(fused[name] - reference[name]) <= RELATIVE * abs(reference[name]), (stage, name)
    acc = f"{'val' if stage == 'validate' else 'test'}_acc"
    assert abs(fused[acc] - reference[acc]) <= TOLERANCE, (stage, acc)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each other callback's figures without FuseOnExport, computed once per callback when first asked for."""
    root = tmp_path_factory.mktemp("reference")
    cache: dict[str, dict[str, Any]] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, other: str) -> dict[str, Any]:
            cache[other] = fit_then_stages(other, None, False, root / other)[0]
            return cache[other]

    return Lazy()


MATRIX = [
    pytest.param(other, first, id=f"{other}-{'fuse_first' if first else 'fuse_last'}")
    if (other, first) in DEFAULT_CASES
    else pytest.param(other, first, id=f"{other}-{'fuse_first' if first else 'fuse_last'}", marks=pytest.mark.slow)
    for other in OTHERS
    for first in (True, False)
]


@pytest.mark.parametrize(("other", "first"), MATRIX)
def test_fuse_on_export_stages_beside_other_callbacks_run_fused_with_the_reference_metrics(
    references: dict[str, dict[str, Any]], tmp_path: Path, other: str, first: bool
) -> None:
    fuse = FuseOnExport(stages=list(STAGES), export_formats=[])
    figures, model = fit_then_stages(other, fuse, first, tmp_path)
    reference = references[other]
    stages = [entry["stage"] for entry in fuse.history]
    assert stages == ["fit", *STAGES]
    assert all(entry["outcome"] == "fused" for entry in fuse.history), fuse.history
    for stage in STAGES:
        assert figures[stage]["kernels"] == [0, 0], stage  # two batches, each step ran the fused network
        assert reference[stage]["kernels"] == [3, 3], stage
        assert_same_figures(stage, figures[stage], reference[stage])
    assert not is_fused(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    if other == "ema":
        # Validation and test read the same batches; EMA swaps its average in for validation only (the weights were
        # moved off it after fit), so the two losses differ: the validation fused the averaged weights.
        val, test = figures["validate"]["val_loss"], figures["test"]["test_loss"]
        assert abs(val - test) > 10 * RELATIVE * abs(test)


# ------------------------------------------------------------------------------------------ compiled modules


class Masked(Classifier):
    """A forward with two inputs: the image and a mask multiplied into it; batches are ``(x, mask, y)``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x * mask))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, mask, y = batch
        return F.cross_entropy(self(x, mask), y)

    def _evaluate(self, batch: Any, prefix: str) -> None:
        x, mask, y = batch
        logits = self(x, mask)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y))
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0], batch[1])


def compiled_stages(model: Any, root: Path, fuse: FuseOnExport | None) -> dict[str, Any]:
    probe = KernelProbe()
    limits = {f"limit_{loop}_batches": 1 for loop in ("val", "test", "predict")}
    trainer = make_trainer(root, [probe] + ([fuse] if fuse is not None else []), **limits)
    figures: dict[str, Any] = {}
    for stage in STAGES:
        probe.per_batch = []
        figures[stage] = run_stage(trainer, model, stage)
        figures[stage]["kernels"] = probe.per_batch
    return figures


def test_fuse_on_export_compiled_lightning_module_runs_fused_at_every_stage(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    compiled = torch.compile(model, backend="eager")
    # fit first: the compiled forward is cached before FuseOnExport's hooks exist (they would not run inside it)
    fit_fuse = FuseOnExport(export_formats=[])
    make_trainer(tmp_path, [fit_fuse], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        compiled, train_dataloaders=loader(seed=0), val_dataloaders=loader(seed=1)
    )
    assert fit_fuse.last_result.outcome is Outcome.FUSED
    assert fit_fuse.last_result.attributes == ["backbone"]

    fuse = FuseOnExport(stages=list(STAGES), export_formats=[])
    fused = compiled_stages(compiled, tmp_path / "fused", fuse)
    reference = compiled_stages(compiled, tmp_path / "reference", None)
    assert [entry["outcome"] for entry in fuse.history] == ["fused"] * 3
    for entry in fuse.history:
        assert any("runs compiled (torch.compile)" in note for note in entry["notes"]), entry["notes"]
        assert entry["kernels_before"] == 3
        assert entry["kernels_after"] == 0
    for stage in STAGES:
        assert fused[stage]["kernels"] == [0], stage
        assert reference[stage]["kernels"] == [3], stage  # the compiled unfused run
        assert_same_figures(stage, fused[stage], reference[stage])
    assert model._compiler_ctx is not None  # still compiled: the instance's compiled methods were put back
    assert "forward" in model.__dict__


def test_fuse_on_export_lightning_module_compiled_in_place_tests_fused(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    model.compile(backend="eager")
    limits = {"limit_test_batches": 1}
    # an unfused test first: the compiled call is cached before FuseOnExport's hooks exist
    probe = KernelProbe()
    reference = make_trainer(tmp_path, [probe], **limits).test(model, dataloaders=loader(seed=2), verbose=False)[0]
    assert probe.per_batch == [3]
    probe.per_batch = []
    fuse = FuseOnExport(export_formats=[])
    tested = make_trainer(tmp_path, [probe, fuse], **limits).test(model, dataloaders=loader(seed=2), verbose=False)[0]
    result = fuse.last_result
    assert result.outcome is Outcome.FUSED
    assert result.attributes == ["backbone"]
    assert any("runs compiled (torch.compile)" in note for note in result.notes)
    assert probe.per_batch == [0]
    assert_same_figures("test", tested, reference)
    assert model._compiled_call_impl is not None  # compiled as before


# ------------------------------------------------------------------------------------------ several inputs


def masked_loader(seed: int, n: int = 64) -> DataLoader:
    return loader(seed, n=n, inputs=2)


def test_fuse_on_export_two_input_forward_binds_the_leading_batch_elements(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = Masked()
    fuse = FuseOnExport(export_dir=str(tmp_path / "out"))  # as written, but for where it writes
    probe = KernelProbe()
    trainer = make_trainer(tmp_path, [probe, fuse], max_epochs=1)
    trainer.fit(model, train_dataloaders=masked_loader(0), val_dataloaders=masked_loader(1))

    result = fuse.last_result
    assert result.outcome is Outcome.FUSED
    assert result.verification is not None
    assert result.verification.passed
    assert "MulticlassAccuracy" in result.verification.metric_original  # element 2 is the target
    note = (
        "input: elements 0-1 of each batch (a list of 3) passed to Masked.forward(x, mask), whose first argument "
        "alone does not take element 0; target: element 2"
    )
    assert any(n.startswith(note) for n in result.notes), result.notes
    assert note in str(result)
    assert set(result.artifacts) == {"pt2", "weights", "ckpt"}

    probe.per_batch = []  # the fit's validation batches
    test = trainer.test(model, dataloaders=masked_loader(2), verbose=False)[0]
    assert probe.per_batch == [0, 0]
    assert any(n.startswith(note) for n in fuse.last_result.notes)
    unfused = make_trainer(tmp_path / "plain", []).test(model, dataloaders=masked_loader(2), verbose=False)[0]
    assert abs(test["test_loss"] - unfused["test_loss"]) <= RELATIVE * abs(unfused["test_loss"])

"""FuseOnExport beside Lightning's own callbacks, in either order: the weights fused, verified and exported are the
ones the user gets from the same run without FuseOnExport (EMA, SWA, pruning made permanent or not, backbone
fine-tuning)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    EMAWeightAveraging,
    ModelPruning,
    StochasticWeightAveraging,
)

from fx_lightning import FuseOnExport
from fx_lightning.examples.data import DigitsDataModule
from fx_lightning.examples.models import DigitsCNN
from fx_lightning.lightning.callback import Outcome
from numerics import rel_err

#: The artifacts may differ from the reference by rounding only.
RELATIVE = 1e-5

OTHERS: dict[str, Callable[[], pl.Callback]] = {
    "ema": lambda: EMAWeightAveraging(decay=0.5),
    "swa": lambda: StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1),
    "pruning": lambda: ModelPruning("l1_unstructured", amount=0.3, verbose=0),
    "pruning_kept": lambda: ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=False, verbose=0),
}
#: Needs a LightningModule with a ``backbone``: run with :class:`BackboneDigitsCNN`, apart from the others.
OTHERS_WITH_BACKBONE: dict[str, Callable[[], pl.Callback]] = {
    "backbone": lambda: BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01),
}


class BackboneDigitsCNN(DigitsCNN):
    """DigitsCNN split into the ``backbone`` (the Conv-BN-ReLU blocks) and ``head`` that BackboneFinetuning needs;
    the optimizer starts with the head alone, BackboneFinetuning adds the backbone when it unfreezes it."""

    def __init__(self, width: int = 4, lr: float = 0.05) -> None:
        super().__init__(width=width, lr=lr)
        self.backbone, self.head = self.net[:5], self.net[5:]
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.hparams.lr)


def run(
    other: str, with_fuse: bool, first: bool, root: Path, model_class: type[DigitsCNN] = DigitsCNN
) -> tuple[DigitsCNN, FuseOnExport | None]:
    pl.seed_everything(0, verbose=False)
    model = model_class(width=4, lr=0.05)
    fuse = FuseOnExport(export_dir=str(root / "fused"), export_formats=["pt2", "ckpt"]) if with_fuse else None
    callbacks: list[Any] = [(OTHERS | OTHERS_WITH_BACKBONE)[other]()]
    if fuse is not None:
        callbacks.insert(0 if first else 1, fuse)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=128))
    return model, fuse


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DigitsCNN]:
    """The model each other callback leaves without FuseOnExport, run once per callback."""
    root = tmp_path_factory.mktemp("reference")
    return {other: run(other, with_fuse=False, first=False, root=root / other)[0] for other in OTHERS}


@pytest.mark.parametrize("first", [True, False], ids=["fuse_first", "fuse_last"])
@pytest.mark.parametrize("other", list(OTHERS))
def test_fuse_on_export_artifacts_equal_the_model_without_it(
    references: dict[str, DigitsCNN], tmp_path: Path, other: str, first: bool
) -> None:
    model, fuse = run(other, with_fuse=True, first=first, root=tmp_path)
    assert fuse is not None
    reference = references[other]
    # The user's model ends exactly as without FuseOnExport.
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    result = fuse.last_result
    assert result.outcome is Outcome.FUSED
    assert result.num_folded == 3
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        expected = reference.eval()(x)
        program = torch.export.load(result.artifacts["pt2"]).module()
        if other == "pruning_kept":  # the pruned layout (<name>_orig, <name>_mask), as the user's own checkpoints
            deployed = copy.deepcopy(reference)
            deployed.load_state_dict(torch.load(result.artifacts["ckpt"], weights_only=True)["state_dict"])
            assert "_orig and <name>_mask" in " ".join(result.notes)
        else:
            deployed = DigitsCNN.load_from_checkpoint(result.artifacts["ckpt"], strict=True).eval()
        assert rel_err(fuse.fused["net"](x), expected) <= RELATIVE
        assert rel_err(program(x), expected) <= RELATIVE
        assert rel_err(deployed(x), expected) <= RELATIVE


@pytest.mark.parametrize("first", [True, False], ids=["fuse_first", "fuse_last"])
def test_fuse_on_export_backbone_finetuning_artifacts_equal_the_model_without_it(tmp_path: Path, first: bool) -> None:
    reference, _ = run(
        "backbone", with_fuse=False, first=False, root=tmp_path / "reference", model_class=BackboneDigitsCNN
    )
    model, fuse = run("backbone", with_fuse=True, first=first, root=tmp_path / "fused", model_class=BackboneDigitsCNN)
    assert fuse is not None
    # The user's model ends exactly as without FuseOnExport, its backbone unfrozen at epoch 1 in both runs.
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert type(model.backbone) is type(reference.backbone)

    result = fuse.last_result
    assert result.outcome is Outcome.FUSED
    assert result.attributes == ["backbone"]
    assert result.num_folded == 3
    # The backbone returns features, which the accuracy cannot score: its artifacts are checked on their outputs.
    assert any("its output is not laid out as BackboneDigitsCNN.forward's" in n for n in result.notes)
    assert set(result.artifacts) == {"pt2", "ckpt"}
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        reference.eval()
        expected = reference(x)
        program = torch.export.load(result.artifacts["pt2"]).module()
        deployed = BackboneDigitsCNN.load_from_checkpoint(result.artifacts["ckpt"], strict=True).eval()
        assert rel_err(fuse.fused["backbone"](x), reference.backbone(x)) <= RELATIVE
        assert rel_err(program(x), reference.backbone(x)) <= RELATIVE
        assert rel_err(deployed(x), expected) <= RELATIVE

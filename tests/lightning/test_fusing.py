"""fusing: one fusion's state and the notes it leaves (the whole fusion runs in the callback tests)."""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from fx_lightning import fuse
from fx_lightning.lightning.batches import InputBinding
from fx_lightning.lightning.fusing import Run, nothing_folded
from fx_lightning.lightning.networks import Network
from fx_lightning.lightning.result import FuseResult


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.BatchNorm1d(3))


def test_nothing_folded_note_counts_the_batch_norms_and_gives_the_reasons() -> None:
    net = Holder().net.eval()
    report = fuse(net).fusion_report
    note = nothing_folded(Network("net", "net"), net, report)
    assert note.startswith("'net': found 1 BatchNorm(s), folded none (")
    assert note.endswith("); no fused network is used for it")


def test_run_of_a_compiled_module_notes_how_it_was_fused() -> None:
    trainer = SimpleNamespace()
    fit = Run(trainer, Holder(), "fit", FuseResult(stage="fit"), InputBinding(), compiled=True)
    assert fit.result.notes == [
        "Holder runs compiled (torch.compile): its networks were fused, verified and exported through its own "
        "uncompiled forward"
    ]
    test = Run(trainer, Holder(), "test", FuseResult(stage="test"), InputBinding(), compiled=True)
    assert test.result.notes[0].endswith("; the test loop's compiled steps run the fused networks")
    assert Run(trainer, Holder(), "test", FuseResult(stage="test"), InputBinding()).result.notes == []

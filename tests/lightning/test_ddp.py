"""FuseOnExport under DDP with two CPU processes (gloo), launched as a script the way users run DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fx_lightning import fuse
from fx_lightning.examples.data import DigitsDataModule
from fx_lightning.examples.models import DigitsCNN
from fx_lightning.verify.verifier import verify

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch

    import fx_lightning.lightning.export as export_module
    from fx_lightning import FuseOnExport
    from fx_lightning.examples.data import DigitsDataModule
    from fx_lightning.examples.models import DigitsCNN

    out = Path(sys.argv[1])
    export = export_module.export_and_verify


    def counted_export(*args, **kwargs):
        # Record every export call per process: exactly one process may write artifacts.
        with open(out / f"export_calls_{pl_trainer.global_rank}.txt", "a") as f:
            f.write("call\\n")
        return export(*args, **kwargs)


    export_module.export_and_verify = counted_export
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN(width=4, lr=0.05)
    callback = FuseOnExport(export_dir=str(out / "fused"), export_formats=["weights"])
    pl_trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
        callbacks=[callback],
    )
    pl_trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    torch.save(
        {
            "fused": callback.fused["net"].state_dict(),
            "original": model.net.state_dict(),
            "net_type": type(model.net).__name__,
            "result": callback.last_result.to_dict(),
        },
        out / f"rank{pl_trainer.global_rank}.pt",
    )
    """
)

#: Two fits in the same two processes: fewer verification batches than processes, then a failure on one rank.
#: Every rank must reach every collective; a hang shows as the subprocess timeout.
FAILURE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch

    import fx_lightning.lightning.fusing as fusing_module
    from fx_lightning import FuseOnExport
    from fx_lightning.examples.data import DigitsDataModule
    from fx_lightning.examples.models import DigitsCNN

    out = Path(sys.argv[1])
    results = {}


    def trainer(callback):
        return pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=1,
            limit_train_batches=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=out,
            callbacks=[callback],
        )


    pl.seed_everything(0, verbose=False)
    callback = FuseOnExport(max_verify_batches=1, export_dir=str(out / "few"), export_formats=[])
    run = trainer(callback)
    run.fit(DigitsCNN(width=4), datamodule=DigitsDataModule(batch_size=64))
    results["few"] = callback.last_result.to_dict()

    engine = fusing_module.fuse


    def fuse_failing_on_rank_one(*args, **kwargs):
        if run.global_rank == 1:
            raise RuntimeError("engine exploded on rank 1")
        return engine(*args, **kwargs)


    fusing_module.fuse = fuse_failing_on_rank_one
    callback = FuseOnExport(export_dir=str(out / "fails"), export_formats=["weights"])
    run = trainer(callback)
    model = DigitsCNN(width=4)
    net = model.net
    run.fit(model, datamodule=DigitsDataModule(batch_size=64))
    results["fails"] = callback.last_result.to_dict()
    results["fails_net_kept"] = model.net is net
    torch.save(results, out / f"rank{run.global_rank}.pt")
    """
)


def run_script(script: str, tmp_path: Path) -> None:
    path = tmp_path / "ddp_fuse.py"
    path.write_text(script)
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, str(path), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-4000:]


def test_fuse_on_export_ddp_two_processes_agree_and_export_once(tmp_path: Path) -> None:
    run_script(SCRIPT, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # Every rank keeps the user's network after fit.
    assert [r["net_type"] for r in ranks] == ["Sequential", "Sequential"]
    assert any(k.endswith("running_mean") for k in ranks[0]["original"])
    assert not any(k.endswith("running_mean") for k in ranks[0]["fused"])
    # Every rank ends with the same fused weights.
    assert ranks[0]["fused"].keys() == ranks[1]["fused"].keys()
    for key, value in ranks[0]["fused"].items():
        assert torch.equal(value, ranks[1]["fused"][key]), key
    # One collective verification: the same figures on both ranks, over the whole validation split.
    results = [r["result"] for r in ranks]
    assert results[0]["verification"] == results[1]["verification"]
    assert results[0]["outcome"] == "fused"
    assert results[0]["verification"]["num_samples"] == 270

    # The synchronised metric equals a single-process verification of the same weights on the same data.
    model = DigitsCNN(width=4)
    model.net.load_state_dict(ranks[0]["original"])
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    single = verify(model.net, fuse(model.net), dm.val_dataloader())
    ddp = results[0]["verification"]
    assert single.num_samples == ddp["num_samples"]
    for name, value in single.metric_original.items():
        assert abs(ddp["metric_original"][name] - value) <= 1e-6, name
        assert abs(ddp["metric_fused"][name] - single.metric_fused[name]) <= 1e-6, name

    # Exactly one set of artifacts, written by global rank zero only.
    assert (tmp_path / "export_calls_0.txt").read_text().count("call") == 1
    assert not (tmp_path / "export_calls_1.txt").exists()
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == sorted(
        [Path(results[0]["artifacts"]["weights"]["path"]).name, "fuse_report.json"]
    )


@pytest.mark.slow
def test_fuse_on_export_ddp_every_rank_reaches_every_collective(tmp_path: Path) -> None:
    run_script(FAILURE_SCRIPT, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # max_verify_batches=1 with two processes: rank 1 sees no batch and still joins the synchronisation.
    few = [r["few"] for r in ranks]
    assert few[0]["outcome"] == few[1]["outcome"] == "fused"
    assert few[0]["verification"] == few[1]["verification"]
    assert few[0]["verification"]["num_samples"] == 64

    # fuse raised on rank 1 only: both ranks end the fit, both report the failure, the user's network stays.
    fails = [r["fails"] for r in ranks]
    assert [f["outcome"] for f in fails] == ["failed", "failed"]
    assert "engine exploded on rank 1" in fails[1]["error"]
    assert "another process failed" in fails[0]["error"]
    assert all(r["fails_net_kept"] for r in ranks)
    report = json.loads((tmp_path / "fails" / "fuse_report.json").read_text())
    assert report["outcome"] == "failed"
    assert not (tmp_path / "fails" / "net.safetensors").exists()

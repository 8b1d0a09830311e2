"""FuseOnExport on LightningModules of every shape: layers on the module itself, networks in containers, a teacher
that forward never calls, a network compiled in configure_model, networks whose own methods the steps call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fx_lightning import FuseOnExport, count_kernels
from fx_lightning.lightning.callback import Outcome, is_fused

# ---------------------------------------------------------------------------------------------------- helpers


def loader(n: int = 64, batch_size: int = 32, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    return DataLoader(data, batch_size=batch_size)


def block(channels: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


class Steps(pl.LightningModule):
    """Cross-entropy steps over ``self(x)``; ``test_step`` records how many BatchNorms the module holds."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_in_test: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_in_test.append(batch_norms(self))
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Tutorial(Steps):
    """Layers defined on the LightningModule itself, wired by its own forward (no network child)."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**(defaults | kwargs))


def fit(model: pl.LightningModule, callback: FuseOnExport, tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    run = trainer(tmp_path, callbacks=[callback], **kwargs)
    run.fit(model, train_dataloaders=loader(), val_dataloaders=loader(seed=1))
    return run


# ------------------------------------------------------------------------------------------------------ tests


def test_fuse_on_export_tutorial_module_folds_its_own_layers_for_test_only(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = Tutorial()
    children = dict(model.named_children())
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["pt2", "ckpt"])
    run = fit(model, callback, tmp_path)

    result = callback.last_result
    assert result.attributes == ["self"]
    assert result.outcome is Outcome.FUSED
    assert result.num_folded == 2
    assert (result.kernels_before, result.kernels_after) == (2, 0)
    assert "-> fused" in str(result)
    # fit leaves the layers as they were: the same objects.
    assert dict(model.named_children()) == children
    assert batch_norms(model) == 2
    fused = callback.fused["self"]
    assert type(fused) is Tutorial
    assert isinstance(fused.bn1, nn.Identity)
    assert isinstance(fused.dropout, nn.Dropout)  # Dropout stays in the default fuse form

    x = torch.randn(5, 1, 8, 8)
    program = torch.export.load(result.artifacts["pt2"]).module()
    deployed = Tutorial.load_from_checkpoint(result.artifacts["ckpt"], strict=True).eval()
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-5)

    run.test(model, dataloaders=loader(seed=2), verbose=False)
    assert model.seen_in_test == [0, 0]  # every Conv-BN pair folded while testing
    assert dict(model.named_children()) == children
    assert not is_fused(model)


class NoFold(Steps):
    """BatchNorms after activations: nothing to fold them into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(F.relu(self.conv(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_fuse_on_export_nothing_folded_never_says_fused_and_exports_the_network_as_it_is(tmp_path: Path) -> None:
    model = NoFold()
    callback = FuseOnExport(export_dir=str(tmp_path / "out"))
    with pytest.warns(
        UserWarning, match=r"folded nothing at the end of fit: 'self': found 1 BatchNorm\(s\), folded none"
    ):
        run = fit(model, callback, tmp_path)
    result = callback.last_result
    assert result.outcome is Outcome.NOTHING_FOLDED
    assert "-> nothing folded" in str(result)
    assert "-> fused" not in str(result)
    # the artifacts asked for are still written: the network as it is, verified the same way, and said so
    assert set(result.artifacts) == {"pt2", "weights", "ckpt"}
    assert all(entry["verification"]["passed"] for entry in result.deploy["artifacts"].values())
    assert any("nothing was folded in ['self']" in note for note in result.notes)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "deploy.ckpt",
        "fuse_report.json",
        "model.pt2",
        "model.safetensors",
    ]
    report = json.loads((tmp_path / "out" / "fuse_report.json").read_text())
    assert report["outcome"] == "nothing folded"
    assert report["reports"]["self"]["skipped"]  # the reason each BatchNorm stayed
    assert callback.fused == {}

    with pytest.warns(UserWarning, match="folded nothing before test"):
        run.test(model, dataloaders=loader(seed=2), verbose=False)
    assert model.seen_in_test == [1, 1]


class Heads(Steps):
    """Two networks in a ModuleDict and one in a ModuleList, summed by forward."""

    def __init__(self) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({"a": block(), "b": block(3)})
        self.extra = nn.ModuleList([block(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets["a"](x) + self.nets["b"](x) + self.extra[0](x)


def test_fuse_on_export_networks_in_module_dict_and_list_each_fused(tmp_path: Path) -> None:
    model = Heads()
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["weights", "ckpt"])
    run = fit(model, callback, tmp_path)
    result = callback.last_result
    assert result.attributes == ["nets.a", "nets.b", "extra.0"]
    assert result.outcome is Outcome.FUSED
    assert result.num_folded == 3
    assert set(result.artifacts) == {"nets.a.weights", "nets.b.weights", "extra.0.weights", "ckpt"}
    assert batch_norms(model) == 3
    run.test(model, dataloaders=loader(seed=2), verbose=False)
    assert model.seen_in_test == [0, 0]
    assert batch_norms(model) == 3


class Distill(Steps):
    """A student that forward calls and a teacher that it never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.student = block()
        self.teacher = block(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def test_fuse_on_export_child_forward_never_calls_is_skipped_with_a_note(tmp_path: Path) -> None:
    model = Distill()
    callback = FuseOnExport(export_dir=str(tmp_path / "out"))
    run = fit(model, callback, tmp_path)
    result = callback.last_result
    assert result.attributes == ["student"]
    assert result.outcome is Outcome.FUSED
    assert any("'teacher' skipped: Distill.forward never calls it" in note for note in result.notes)
    assert set(result.artifacts) == {"pt2", "weights", "ckpt"}
    run.test(model, dataloaders=loader(seed=2), verbose=False)
    assert model.seen_in_test == [1, 1]  # the teacher's BatchNorm is left alone


class Compiled(Steps):
    """A network compiled in configure_model, as Lightning's docs show."""

    def __init__(self) -> None:
        super().__init__()
        self.net = block()

    def configure_model(self) -> None:
        if not hasattr(self.net, "_orig_mod"):
            self.net = torch.compile(self.net, backend="eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_in_test.append(batch_norms(self.net._orig_mod) if hasattr(self.net, "_orig_mod") else -1)
        super().test_step(batch, batch_idx)
        self.seen_in_test.pop(-1)


def test_fuse_on_export_compiled_network_fused_behind_compile_and_compiled_again(tmp_path: Path) -> None:
    model = Compiled()
    callback = FuseOnExport(export_dir=str(tmp_path / "out"), export_formats=["pt2", "ckpt"])
    run = fit(model, callback, tmp_path)
    compiled = model.net
    assert type(compiled).__name__ == "OptimizedModule"
    result = callback.last_result
    assert result.attributes == ["net"]
    assert result.outcome is Outcome.FUSED
    assert result.num_folded == 1
    x = torch.randn(2, 1, 8, 8)
    assert count_kernels(callback.fused["net"], x) == 0
    deployed = Compiled.load_from_checkpoint(result.artifacts["ckpt"], strict=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), callback.fused["net"](x), rtol=1e-4, atol=1e-5)

    class CompiledProbe(pl.Callback):
        seen: list[tuple[str, int]] = []

        def on_test_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self.seen.append((type(pl_module.net).__name__, batch_norms(pl_module.net._orig_mod)))

    probe = CompiledProbe()
    run.callbacks.append(probe)
    run.test(model, dataloaders=loader(seed=2), verbose=False)
    assert probe.seen == [("OptimizedModule", 0), ("OptimizedModule", 0)]
    assert model.net is compiled


class Embedder(nn.Module):
    """A network with a method of its own that the steps call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 64, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class EmbedSteps(Steps):
    def __init__(self) -> None:
        super().__init__()
        self.net = Embedder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, int]:
        return self.net.embed(batch[0]), batch_norms(self.net)


def test_fuse_on_export_predict_step_calling_network_methods_runs_fused(tmp_path: Path) -> None:
    model = EmbedSteps()
    callback = FuseOnExport(export_formats=[])
    run = fit(model, callback, tmp_path)
    fused_out = run.predict(model, dataloaders=loader(seed=2))
    plain_out = trainer(tmp_path).predict(model, dataloaders=loader(seed=2))
    assert [n for _, n in fused_out] == [0, 0]
    assert [n for _, n in plain_out] == [1, 1]
    for (fused, _), (plain, _) in zip(fused_out, plain_out):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


class TimmSteps(Steps):
    """A timm network whose forward_features the predict_step calls."""

    def __init__(self) -> None:
        super().__init__()
        timm = pytest.importorskip("timm")
        self.net = timm.create_model("resnet10t", pretrained=False, num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, int]:
        return self.net.forward_features(batch[0]), batch_norms(self.net)


def test_fuse_on_export_timm_forward_features_runs_fused_in_predict(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    data = DataLoader(
        list(zip(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen))), batch_size=8
    )
    model = TimmSteps()
    callback = FuseOnExport(export_formats=[])
    pl.seed_everything(0, verbose=False)
    run = trainer(tmp_path, callbacks=[callback])
    run.fit(model, data, data)
    assert callback.last_result.outcome is Outcome.FUSED
    assert callback.last_result.num_folded == batch_norms(model.net)
    fused_out = run.predict(model, dataloaders=data)
    plain_out = trainer(tmp_path).predict(model, dataloaders=data)
    assert [n for _, n in fused_out] == [0, 0]
    for (fused, _), (plain, _) in zip(fused_out, plain_out):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)

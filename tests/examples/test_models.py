"""The example LightningModules: DigitsCNN learns the digits, ResNetClassifier loads local weights, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import nn

import fx_lightning
from fx_lightning.examples.data import DigitsDataModule
from fx_lightning.examples.models import DigitsCNN, ResNetClassifier, load_resnet_weights
from fx_lightning.testing import randomize_batch_norm


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Tiny convolutions run faster on one thread than on two contended ones on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_digits_cnn_structure_and_hparams() -> None:
    model = DigitsCNN(width=8, num_classes=7, lr=0.02, dropout=0.2)
    assert model.hparams == {"width": 8, "num_classes": 7, "lr": 0.02, "dropout": 0.2}
    convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 3
    assert all(c.bias is None for c in convs)
    assert isinstance(model.net[-1], nn.Linear)
    assert model.net[-1].out_features == 7
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(model(x), model.net(x), rtol=0, atol=0)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)  # larger images work too
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)


def test_digits_cnn_fuses_every_batch_norm() -> None:
    model = DigitsCNN(width=4)
    randomize_batch_norm(model.net)
    fused = fx_lightning.fuse(model.net)
    assert fused.fusion_report.num_folded == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(fused(x), model.net.eval()(x), rtol=1e-5, atol=1e-5)


def test_digits_cnn_trains_to_90_percent_validation_accuracy(one_thread: None) -> None:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    model = DigitsCNN()
    trainer = _trainer(max_epochs=5)
    trainer.fit(model, dm)
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(trainer.logged_metrics)
    val = trainer.validate(model, dm, verbose=False)[0]
    test = trainer.test(model, dm, verbose=False)[0]
    assert val["val_acc"] >= 0.90
    assert test["test_acc"] >= 0.90
    assert val["val_loss"] < 0.5
    assert {"test_loss", "test_acc"} <= set(test)
    predictions = trainer.predict(model, dm)
    logits = torch.cat(predictions)
    assert logits.shape == (len(dm.test_set), 10)
    accuracy = (logits.argmax(1) == dm.test_set.tensors[1]).float().mean()
    assert float(accuracy) >= 0.90


def test_digits_cnn_predict_step_accepts_bare_tensor() -> None:
    model = DigitsCNN(width=4).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model.predict_step(x, 0), model.predict_step((x, torch.zeros(2)), 0), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, r"DigitsCNN\(width=0\) expects a positive integer"),
        ({"num_classes": 1.5}, r"DigitsCNN\(num_classes=1.5\) expects a positive integer"),
        ({"lr": 0.0}, r"DigitsCNN\(lr=0.0\) expects a positive learning rate"),
        ({"dropout": 1.0}, r"DigitsCNN\(dropout=1.0\) expects a probability in \[0, 1\)"),
    ],
)
def test_digits_cnn_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsCNN(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, r"ResNetClassifier\(num_classes=0\) expects a positive integer"),
        ({"lr": -1.0}, r"ResNetClassifier\(lr=-1.0\) expects a positive learning rate"),
    ],
)
def test_resnet_classifier_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResNetClassifier(**kwargs)


@pytest.fixture(scope="module")
def imagenet_like_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 1000-class resnet18 state dict on disk, as an ImageNet download would be (random values here)."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    randomize_batch_norm(net)
    state = net.state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18_imagenet.pth"
    torch.save(state, path)
    return path, state


def test_resnet_classifier_loads_weights_and_skips_imagenet_head(
    imagenet_like_weights: tuple[Path, dict[str, torch.Tensor]], one_thread: None
) -> None:
    path, state = imagenet_like_weights
    model = ResNetClassifier(num_classes=10, weights_path=str(path))
    own = {k: v.clone() for k, v in model.net.state_dict().items()}
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)
    assert own["fc.weight"].shape == (10, 512)
    assert model.hparams["weights_path"] == str(path)
    # one training step on 32x32 inputs: the loss is finite and the head receives gradients
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, loader)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert not torch.equal(model.net.fc.weight, own["fc.weight"])


def test_load_resnet_weights_accepts_lightning_checkpoint_layout(
    imagenet_like_weights: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = imagenet_like_weights
    wrapped = {"state_dict": {f"net.{k}": v for k, v in state.items()}}
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    net = torchvision.models.resnet18(weights=None)
    skipped = load_resnet_weights(net, path)
    assert skipped == []
    torch.testing.assert_close(net.fc.weight, state["fc.weight"], rtol=0, atol=0)


def test_resnet_classifier_freeze_backbone_trains_only_head() -> None:
    model = ResNetClassifier(num_classes=3, freeze_backbone=True)
    trainable = {name for name, p in model.net.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert not model.net.bn1.track_running_stats  # BaseFinetuning.freeze semantics: BN statistics frozen
    optimizer = model.configure_optimizers()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2


def test_resnet_classifier_missing_weights_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"weights_path='.*nope.pth'\): no such file"):
        ResNetClassifier(weights_path=str(missing))


def test_load_resnet_weights_unreadable_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=r"could not read the file as a state dict"):
        load_resnet_weights(torchvision.models.resnet18(weights=None), path)


def test_load_resnet_weights_non_dict_raises(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(RuntimeError, match=r"holds a list, expected a dict of tensors"):
        load_resnet_weights(torchvision.models.resnet18(weights=None), path)


def test_load_resnet_weights_wrong_architecture_raises(
    imagenet_like_weights: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = imagenet_like_weights
    net = torchvision.models.resnet18(weights=None)
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"does not match torchvision's resnet18: missing keys \['layer4"):
        load_resnet_weights(net, tmp_path / "partial.pth")
    reshaped = dict(state)
    reshaped["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(RuntimeError, match=r"(?s)does not fit torchvision's resnet18: .*conv1.weight"):
        load_resnet_weights(net, tmp_path / "reshaped.pth")

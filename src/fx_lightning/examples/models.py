"""Example LightningModules with BatchNorm to fuse: a small CNN for the digits and a ResNet-18 classifier.

Both keep the network at ``self.net`` and log the same names (``train_loss``, ``val_loss``, ``val_acc``,
``test_loss``, ``test_acc``), so a callback or a config can treat them alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import BaseFinetuning
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


class _Classifier(pl.LightningModule):
    """Shared steps: cross-entropy loss and accuracy over ``self.net``'s logits."""

    net: nn.Module

    def _init_metrics(self, num_classes: int) -> None:
        self.train_acc = MulticlassAccuracy(num_classes=num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of ``self.net``."""
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy on an ``(x, y)`` batch; logs ``train_loss`` and ``train_acc``."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc``."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc``."""
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits for an ``(x, y)`` batch or a bare input tensor."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)


class DigitsCNN(_Classifier):
    """A small Conv-BN-ReLU network for 8x8 (or larger) grey digits.

    Three convolution blocks without bias (the BatchNorm after each supplies it), max pooling after the
    first two, global average pooling, dropout and a linear head.

    Example:
        >>> model = DigitsCNN(width=8)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 16, num_classes: int = 10, lr: float = 0.01, dropout: float = 0.1) -> None:
        """Build the network.

        Args:
            width: channels of the first convolution block; the later blocks use twice as many.
            num_classes: number of output logits.
            lr: Adam learning rate.
            dropout: dropout probability before the linear head, in ``[0, 1)``.

        Raises:
            ValueError: if an argument is out of its range.
        """
        super().__init__()
        _check_positive("DigitsCNN", "width", width, "width=16")
        _check_positive("DigitsCNN", "num_classes", num_classes, "num_classes=10")
        _check_lr("DigitsCNN", lr)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"DigitsCNN(dropout={dropout!r}) expects a probability in [0, 1), e.g. dropout=0.1.")
        self.save_hyperparameters()
        wide = 2 * width
        self.net = nn.Sequential(
            _conv_block(1, width),
            nn.MaxPool2d(2),
            _conv_block(width, wide),
            nn.MaxPool2d(2),
            _conv_block(wide, wide),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(wide, num_classes),
        )
        self._init_metrics(num_classes)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over every parameter."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResNetClassifier(_Classifier):
    """torchvision's ResNet-18 as a classifier, optionally starting from a local weights file.

    Nothing is downloaded: pass ``weights_path`` to a state dict saved with ``torch.save`` (for instance
    ImageNet weights fetched once by hand). For images as small as the digits, resize them to 32x32 with
    ``DigitsDataModule(image_size=32, channels=3)``.

    Example:
        >>> model = ResNetClassifier(num_classes=10).eval()
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 1e-3,
        weights_path: str | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        """Build ResNet-18 and load the weights.

        Args:
            num_classes: number of output logits; the final ``fc`` layer is sized for it.
            lr: Adam learning rate.
            weights_path: a local file holding a ResNet-18 state dict (``torch.load(weights_only=True)``).
                ``fc.*`` entries whose shapes do not match ``num_classes`` (e.g. 1000 ImageNet classes)
                are skipped, so the head starts fresh.
            freeze_backbone: train only ``fc``; everything else is frozen with
                :meth:`lightning.pytorch.callbacks.BaseFinetuning.freeze`, BatchNorm statistics included.

        Raises:
            ValueError: if ``num_classes`` or ``lr`` is out of range.
            FileNotFoundError: if ``weights_path`` does not exist.
            RuntimeError: if the file does not hold ResNet-18 weights.
        """
        super().__init__()
        _check_positive("ResNetClassifier", "num_classes", num_classes, "num_classes=10")
        _check_lr("ResNetClassifier", lr)
        self.save_hyperparameters()
        self.net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if weights_path is not None:
            load_resnet_weights(self.net, weights_path)
        if freeze_backbone:
            BaseFinetuning.freeze([m for name, m in self.net.named_children() if name != "fc"], train_bn=False)
        self._init_metrics(num_classes)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the parameters that are not frozen."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=self.hparams.lr)


def load_resnet_weights(net: nn.Module, weights_path: str | Path) -> list[str]:
    """Load a local ResNet state dict into ``net``, skipping ``fc.*`` entries whose shapes differ.

    Args:
        net: the ResNet to load into.
        weights_path: a file saved with ``torch.save(state_dict)``; a ``{"state_dict": ...}`` wrapper and
            a ``net.`` prefix (a checkpoint of :class:`ResNetClassifier`) are accepted too.

    Returns:
        The keys that were skipped.

    Raises:
        FileNotFoundError: if the file does not exist.
        RuntimeError: if the file cannot be read as a state dict or does not match the architecture.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ResNetClassifier(weights_path={str(weights_path)!r}): no such file. Pass the path of a state dict "
            "saved with torch.save(model.state_dict(), path), or weights_path=None to start from random weights."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"ResNetClassifier(weights_path={str(weights_path)!r}) could not read the file as a state dict: {err}. "
            "Save it with torch.save(model.state_dict(), path)."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RuntimeError(
            f"ResNetClassifier(weights_path={str(weights_path)!r}) holds a {type(state).__name__}, expected a dict "
            "of tensors. Save it with torch.save(model.state_dict(), path)."
        )
    if state and all(str(k).startswith("net.") for k in state):
        state = {k[len("net.") :]: v for k, v in state.items()}
    own = net.state_dict()
    skipped = [
        k for k, v in state.items() if k.startswith("fc.") and k in own and getattr(v, "shape", None) != own[k].shape
    ]
    kept = {k: v for k, v in state.items() if k not in skipped}
    try:
        missing, unexpected = net.load_state_dict(kept, strict=False)
    except RuntimeError as err:  # shape mismatches outside fc: a different architecture
        raise RuntimeError(
            f"ResNetClassifier(weights_path={str(weights_path)!r}) does not fit torchvision's resnet18: {err}. "
            "Pass a resnet18 state dict."
        ) from err
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise RuntimeError(
            f"ResNetClassifier(weights_path={str(weights_path)!r}) does not match torchvision's resnet18: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
            "Pass a resnet18 state dict."
        )
    return skipped


def _check_positive(owner: str, name: str, value: Any, example: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}({name}={value!r}) expects a positive integer, e.g. {example}.")


def _check_lr(owner: str, lr: Any) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"{owner}(lr={lr!r}) expects a positive learning rate, e.g. lr=0.001.")

"""Fuse a torchvision model with randomised BatchNorm statistics and print the report and the error.

python scripts/fuse_demo.py --model resnet18
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from fx_lightning import count_kernels, fuse
from fx_lightning.testing import randomize_batch_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None)
    randomize_batch_norm(model)
    fused = fuse(model)
    print(fused.fusion_report)

    x = torch.randn(2, 3, args.size, args.size)
    with torch.no_grad():
        ref, out = model.eval()(x), fused(x)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"batch-norm kernels run: {count_kernels(model, x)} before, {count_kernels(fused, x)} after")
    print(f"max relative error vs the unfused model: {rel:.2e}")


if __name__ == "__main__":
    main()

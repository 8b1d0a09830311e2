"""``weights``: the state dict (safetensors, else ``torch.save``), loaded strictly into a copy of the network."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fx_lightning.deploy.formats.base import (
    Exporter,
    ExportJob,
    LoadContext,
    Runner,
    no_options,
    on_device,
)


def write_weights(job: ExportJob, stem: Path, options: Mapping[str, Any]) -> Path:
    """Save the module's state dict to ``<stem>.safetensors`` (``<stem>.pt`` without safetensors)."""
    # Plain contiguous CPU copies: safetensors refuses shared or strided storage, and the file must not
    # depend on the device the module ran on.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in job.module.state_dict().items()}
    save, _, suffix = weights_backend()
    path = stem.with_name(stem.name + suffix)
    save(state, path)
    return path


def load_weights(path: Path, context: LoadContext) -> Runner:
    """A copy of the network whose every value was wiped, then restored from the file with a strict load."""
    restored = copy.deepcopy(context.module)
    with torch.no_grad():
        # Wipe every saved value first, so the check proves the file restores all of them.
        for value in restored.state_dict(keep_vars=True).values():
            if value.is_floating_point():
                value.fill_(math.nan)
    _, load, _ = weights_backend(path.suffix)
    restored.load_state_dict(load(path), strict=True)
    restored.eval()
    return on_device(restored, context.module)


def weights_runtime(options: Mapping[str, Any]) -> str:
    return "torch eager, load_state_dict(strict=True)"


def weights_backend(
    suffix: str | None = None,
) -> tuple[Callable[[dict[str, Tensor], Path], None], Callable[[Path], Any], str]:
    """``(save, load, suffix)``: safetensors when installed (or when ``suffix`` asks for it), else ``torch.save``."""
    if suffix != ".pt":
        try:
            from safetensors.torch import load_file, save_file
        except ImportError:
            pass
        else:
            return (
                (lambda state, path: save_file(state, str(path))),
                (lambda path: load_file(str(path))),
                ".safetensors",
            )
    return (
        lambda state, path: torch.save(state, path),
        lambda path: torch.load(path, map_location="cpu", weights_only=True),
        ".pt",
    )


WEIGHTS = Exporter(
    name="weights",
    write=write_weights,
    load=load_weights,
    runtime=weights_runtime,
    check=no_options("weights"),
    traced=False,
)

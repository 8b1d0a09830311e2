"""``pt2``: a ``torch.export`` program (``torch.export.save``), run by ``torch.export.load(path).module()``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fx_lightning.deploy.formats.base import (
    Exporter,
    ExportJob,
    LoadContext,
    Runner,
    no_options,
    on_device,
)


def write_pt2(job: ExportJob, stem: Path, options: Mapping[str, Any]) -> Path:
    """Save the job's ``torch.export`` program to ``<stem>.pt2``."""
    path = stem.with_name(stem.name + ".pt2")
    torch.export.save(job.program("pt2"), path)
    return path


def load_pt2(path: Path, context: LoadContext) -> Runner:
    """The saved program as a module (on the device its weights were saved from)."""
    program = torch.export.load(path).module()
    # a plain function, not the module: exported modules refuse .eval(), which verification calls on modules
    return on_device(program, context.module)


def pt2_runtime(options: Mapping[str, Any]) -> str:
    return f"torch.export.load (torch {torch.__version__.split('+')[0]})"


PT2 = Exporter(name="pt2", write=write_pt2, load=load_pt2, runtime=pt2_runtime, check=no_options("pt2"))

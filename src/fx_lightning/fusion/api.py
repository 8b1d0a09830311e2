"""``fuse``, the public entry of fusion: validate the call, run the engine on a copy, self-check, attach the report.

The engine (:mod:`fx_lightning.fusion.engine`) does the tracing, the passes and the write-back; this module holds
what the user calls and the checks of what they passed.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fx_lightning.fusion.engine import Form, _Engine
from fx_lightning.fusion.passes import registered_passes
from fx_lightning.fusion.report import FusionReport
from fx_lightning.fusion.self_check import check_units, run_example
from fx_lightning.fusion.tracing import contains_batch_norm, detached_copy

REPORT_ATTR = "fusion_report"
_FORMS = ("modules", "graph")


def fuse(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    passes: Sequence[str] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    form: Form = "modules",
) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every BatchNorm that can be folded exactly folded.

    The result computes what ``model.eval()`` computes. ``model`` itself is never modified: its
    parameters, buffers, ``requires_grad`` flags and ``training`` flag stay as they were. Untouched
    parameters are shared with ``model`` (new ``Parameter`` objects over the same storage, so no
    weight memory is duplicated): treat them as read-only. Buffers are copied.

    With ``form="modules"`` (the default) the result is a copy of ``model`` of the same class: each folded
    layer sits at its own path, each folded BatchNorm is an ``nn.Identity``, Dropout stays, and every method of
    the model (``forward_features``, ``.features``, your own) runs as written. Only a module whose rewrite needs
    generated code (merged RepVGG-style branches, folds into functional calls) becomes a ``GraphModule``; the
    report lists those in ``graphs``. With ``form="graph"`` the whole traced model is one ``GraphModule``
    (Dropout and Identity calls removed, every layer called directly), as for export or benchmarks.

    When the whole model cannot be traced by torch.fx, the largest sub-modules that can be are traced
    and fused, and the parts left untraced are named in the report with the tracer's error.

    Args:
        model: the network to fuse, in train or eval mode.
        example_inputs: optional positional inputs for one forward call. With them, tensor shapes are
            propagated (which settles ranks the graph alone leaves open, e.g. ``Linear`` + ``BatchNorm1d``), and
            each rewrite is checked where it happens (see :mod:`fx_lightning.fusion.self_check`): the module holding it
            runs, as it was and as rewritten, on what it receives from them; a rewrite that changes its output
            beyond rounding is reverted and listed in the report's ``reverted`` with the reason.
        passes: names of the registered passes to run, in registry order; all by default
            (see :func:`fx_lightning.fusion.passes.registered_passes`).
        leaf_modules: module classes to keep as single calls instead of tracing through them.
        form: ``"modules"`` (the user's module tree with fused layers in place) or ``"graph"`` (one
            ``GraphModule``).

    Returns:
        An ``nn.Module`` in eval mode, with the :class:`FusionReport` at ``result.fusion_report``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, is wrapped (TorchScript, ``DataParallel``,
            ``DistributedDataParallel``, ``torch.compile``), or ``example_inputs`` is not a sequence.
        ValueError: if ``passes`` names a pass that is not registered, ``form`` is unknown, or the model cannot
            run on ``example_inputs``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> fused = fuse(net)
        >>> type(fused) is nn.Sequential, [type(m).__name__ for m in fused]
        (True, ['Conv2d', 'Identity', 'ReLU'])
        >>> fused.fusion_report.num_folded
        1
    """
    chosen = _validate(model, example_inputs, passes, leaf_modules, form)
    start = time.perf_counter()
    report = FusionReport(model=type(model).__name__)
    with torch.no_grad(), _collector_paused():
        root = detached_copy(model)
        engine = _Engine(chosen, tuple(leaf_modules), form, report)
        engine.checked = example_inputs is not None
        if example_inputs is not None:
            engine.example = (model, tuple(example_inputs))
        engine.instances = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        fused = engine.fuse_region(root, "", example_inputs, below_untraced=False)
        if example_inputs is not None and engine.units:
            fused = check_units(fused, engine.units, tuple(example_inputs), report, engine.recording)
        elif example_inputs is not None and engine.recording is None:
            run_example(fused, tuple(example_inputs))  # nothing rewritten: still, the inputs must suit the model
    if not report.folded and not report.skipped and not report.merged and not contains_batch_norm(fused):
        report.notes.append("no BatchNorm found: returned an eval-mode copy, unchanged")
    report.seconds = time.perf_counter() - start
    fused.eval()
    object.__setattr__(fused, REPORT_ATTR, report)
    return fused


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused, and left as it was afterwards.

    Tracing makes many small objects (graph nodes, proxies), and each collection they trigger walks every object of
    the process: hundreds of thousands once torch and a model library are imported, a fifth of the time of a fuse
    of YOLO11n. What a fuse leaves in cycles is collected right after it, and the float64 copies of a unit that the
    self-check makes on its rare slow path are collected as soon as they are compared (``self_check``).
    ``gc.freeze()`` instead, which only sets the existing objects aside, left the models of earlier calls uncollected
    for longer: fusing torchvision's VGG models one after another grew by about 0.5 GB per model.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _validate(
    model: Any, example_inputs: Any, passes: Sequence[str] | None, leaf_modules: Sequence[Any], form: Any
) -> dict[str, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fuse(model=...) expects a torch.nn.Module, got {type(model).__name__}. "
            "Pass the network itself, e.g. fuse(lightning_module.net)."
        )
    wrapped = _wrapper_hint(model)
    if wrapped:
        raise TypeError(f"fuse(model=...) got a {type(model).__name__}, which fx cannot fold through. {wrapped}")
    if example_inputs is not None and (
        isinstance(example_inputs, (torch.Tensor, str)) or not isinstance(example_inputs, Sequence)
    ):
        raise TypeError(
            f"fuse(example_inputs=...) expects a tuple or list of positional inputs, got "
            f"{type(example_inputs).__name__}. Wrap a single tensor: example_inputs=(x,)."
        )
    bad_leaves = [leaf for leaf in leaf_modules if not (isinstance(leaf, type) and issubclass(leaf, nn.Module))]
    if bad_leaves:
        raise TypeError(
            f"fuse(leaf_modules={list(leaf_modules)!r}) expects nn.Module subclasses, got {bad_leaves!r}. "
            "Pass classes, e.g. leaf_modules=[MyBlock]."
        )
    if form not in _FORMS:
        raise ValueError(
            f"fuse(form={form!r}) expects one of {list(_FORMS)}: 'modules' keeps your module tree with fused "
            "layers in place, 'graph' returns one GraphModule."
        )
    registry = registered_passes()
    if passes is None:
        return registry
    unknown = [p for p in passes if p not in registry]
    if unknown:
        raise ValueError(
            f"fuse(passes={list(passes)!r}) names unknown pass(es) {unknown}. Registered passes: {list(registry)}."
        )
    return {name: fn for name, fn in registry.items() if name in passes}


def _wrapper_hint(model: nn.Module) -> str:
    """The fix for a model wrapped in something torch.fx cannot trace through, or ``""``."""
    if isinstance(model, torch.jit.ScriptModule):
        return "Pass the eager nn.Module you scripted, before torch.jit.script/trace."
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "Pass the wrapped network instead: fuse(model.module)."
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        return "Pass the module you compiled: fuse(model._orig_mod), then torch.compile the result."
    return ""

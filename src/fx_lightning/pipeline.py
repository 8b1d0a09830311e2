"""``fuse``: trace, run the registered passes in order, recompile, and collect the report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fx_lightning.codegen import install_direct_calls
from fx_lightning.passes import registered_passes
from fx_lightning.passes.common import PassResult, erase_dead_code, match_batch_norm
from fx_lightning.report import FusionReport, Skipped, Untraced
from fx_lightning.tracing import contains_batch_norm, detached_copy, is_batch_norm_module, trace

REPORT_ATTR = "fusion_report"
_MAX_ROUNDS = 8


def fuse(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    passes: Sequence[str] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every BatchNorm that can be folded exactly folded.

    The result computes what ``model.eval()`` computes. ``model`` itself is never modified: its
    parameters, buffers, ``requires_grad`` flags and ``training`` flag stay as they were. Untouched
    parameters are shared with ``model`` (new ``Parameter`` objects over the same storage, so no
    weight memory is duplicated): treat them as read-only. Buffers are copied.

    When the whole model cannot be traced by torch.fx, the largest sub-modules that can be are traced
    and fused, and the parts left untraced are named in the report with the tracer's error.

    Args:
        model: the network to fuse, in train or eval mode.
        example_inputs: optional positional inputs for one forward call. With them, tensor shapes are
            propagated, which lets ``Linear`` + ``BatchNorm1d`` fold wherever the input is 2-D and
            checks that convolutions see batched input. Without them, convolutions are assumed to be
            called on batched input (as ``BatchNorm2d``/``3d`` require anyway).
        passes: names of the registered passes to run, in registry order; all by default
            (see :func:`fx_lightning.passes.registered_passes`).
        leaf_modules: module classes to keep as single calls instead of tracing through them.

    Returns:
        An ``nn.Module`` (a ``torch.fx.GraphModule`` when the whole model was traced) in eval mode,
        with the :class:`FusionReport` at ``result.fusion_report``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, is wrapped (TorchScript, ``DataParallel``,
            ``DistributedDataParallel``, ``torch.compile``), or ``example_inputs`` is not a sequence.
        ValueError: if ``passes`` names a pass that is not registered, or the model cannot run on
            ``example_inputs``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> fused = fuse(net)
        >>> [type(m).__name__ for m in fused.children()]
        ['Conv2d', 'ReLU']
        >>> fused.fusion_report.num_folded
        1
    """
    chosen = _validate(model, example_inputs, passes, leaf_modules)
    start = time.perf_counter()
    report = FusionReport(model=type(model).__name__)
    with torch.no_grad():
        root = detached_copy(model)
        fused = _fuse_tree(root, "", report, chosen, tuple(leaf_modules), example_inputs)
    if not report.folded and not report.skipped and not report.merged and not contains_batch_norm(fused):
        report.notes.append("no BatchNorm found: returned an eval-mode copy, unchanged")
        fused = root
    report.seconds = time.perf_counter() - start
    fused.eval()
    object.__setattr__(fused, REPORT_ATTR, report)
    return fused


def _validate(
    model: Any, example_inputs: Any, passes: Sequence[str] | None, leaf_modules: Sequence[Any]
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


def _fuse_tree(
    module: nn.Module,
    path: str,
    report: FusionReport,
    passes: dict[str, Any],
    leaf_types: tuple[type, ...],
    example_inputs: Sequence[Any] | None,
) -> nn.Module:
    """Fuse ``module`` as one graph if it traces, else fuse its children one by one."""
    traced = trace(module, leaf_types)
    gm = traced.graph_module
    if gm is None:
        report.untraced.append(Untraced(path or "<model>", traced.error))
        for name, child in list(module.named_children()):
            child_path = _join(path, name)
            if is_batch_norm_module(child):
                report.skipped.append(Skipped(child_path, f"its parent '{path or '<model>'}' could not be traced"))
            elif contains_batch_norm(child) and not _is_torch_leaf(child):
                setattr(module, name, _fuse_tree(child, child_path, report, passes, leaf_types, None))
        return module

    if example_inputs is not None:
        try:
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as err:
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
            raise ValueError(
                f"fuse(example_inputs=...) could not run the model on inputs of shapes {shapes}: "
                f"{type(err).__name__}: {err}. Pass inputs the model's forward accepts, or leave example_inputs out."
            ) from err
    _run_passes(gm, path, report, passes)
    for name in traced.opaque:
        sub = gm.get_submodule(name)
        if contains_batch_norm(sub):
            gm.add_submodule(name, _fuse_tree(sub, _join(path, name), report, passes, leaf_types, None))
        else:
            report.untraced.append(Untraced(_join(path, name), traced.opaque[name]))
    report.traced.append(path or "<model>")
    return gm


def _run_passes(gm: fx.GraphModule, path: str, report: FusionReport, passes: dict[str, Any]) -> None:
    local = FusionReport()
    reasons: dict[str, list[str]] = {}
    # One rewrite can enable another (a merged conv followed by BN or a constant scale): repeat until none
    # applies. The reasons kept are those of the last round, which saw the final graph.
    for _ in range(_MAX_ROUNDS):
        changed = False
        reasons = {}
        for fn in passes.values():
            result: PassResult = fn(gm)
            local.folded += result.folded
            local.removed += result.removed
            local.merged += result.merged
            for node_name, reason in result.reasons.items():
                if reason not in reasons.setdefault(node_name, []):
                    reasons[node_name].append(reason)
            if result.modified:
                erase_dead_code(gm)
                changed = True
        if not changed:
            break
    for node in gm.graph.nodes:
        bn = match_batch_norm(gm, node)
        if bn is not None:
            why = "; ".join(reasons.get(node.name, [])) or "no fusion pass applies to it"
            local.skipped.append(Skipped(bn.name, why))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    install_direct_calls(gm)
    report.merge(local, path)


def _is_torch_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn") and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

"""The fusion engine behind :func:`~fx_lightning.fusion.api.fuse`: trace, run the passes, write the rewrites back.

The default form keeps the user's network: each rewrite that amounts to replacing modules at their own paths
(a layer by its folded twin, a BatchNorm by ``nn.Identity``) is written into a copy of the user's module tree,
so every method of the user's classes keeps working. A rewrite that needs generated code (merged branches,
folds into functional calls, a layer folded at one of several call sites) replaces the smallest module whose
forward holds it by that module's fused ``GraphModule``. ``form="graph"`` returns one ``GraphModule`` for the
whole traced model instead.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from fx_lightning.fusion.codegen import install_direct_calls
from fx_lightning.fusion.module_paths import common_scope, find_module, within
from fx_lightning.fusion.padded_conv import chained_children, padded_conv_family, parsed_source
from fx_lightning.fusion.passes.manager import PassRun, run_passes
from fx_lightning.fusion.passes.matching import match_batch_norm, plain_layer_family, value_users
from fx_lightning.fusion.passes.rewriting import PASS_THROUGH, Rewrite, erase_dead_code, scope_of
from fx_lightning.fusion.report import Folded, FusionReport, Skipped, Untraced
from fx_lightning.fusion.self_check import Recording, run_seeded
from fx_lightning.fusion.shapes import Inputs, deferred
from fx_lightning.fusion.tracing import (
    TraceResult,
    contains_batch_norm,
    detached_copy,
    has_forward_hooks,
    is_batch_norm_module,
    trace,
)

Form = Literal["modules", "graph"]
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ----------------------------------------------------------------------------------------------- the engine


@dataclass
class _Unit:
    """One module replacement made in the copy: ``container._modules[name]`` went from ``old`` to ``new``.

    ``container`` is ``None`` for the model itself (the whole model replaced by a graph). ``scope`` is the path of
    the smallest module whose forward holds the rewrite and every reader of what it changed: the self-check runs
    that module, as it was and as rewritten, on the inputs it gets from the example inputs.
    """

    path: str
    container: nn.Module | None
    name: str
    old: nn.Module
    new: nn.Module
    group: int = 0  # replacements made for one rewrite share a group and are kept or reverted together
    scope: str = ""

    def set(self, applied: bool) -> None:
        if self.container is not None:
            self.container._modules[self.name] = self.new if applied else self.old


class _Sites:
    """Who reaches which module in a traced graph, taken before the passes change it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.calls: Counter[str] = Counter()
        self.fetches: list[tuple[str, str]] = []  # (get_attr target, scope of the fetching forward)
        self.part_calls: list[tuple[str, str]] = []  # (call_module target, scope of the calling forward)
        self.bn_owners: Counter[str] = Counter()  # scope of each BatchNorm call made from a module's own forward
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] += 1
                self.part_calls.append((str(node.target), scope_of([node])))
            elif node.op == "get_attr":
                self.fetches.append((str(node.target), scope_of([node])))
            if node.op != "call_module" and match_batch_norm(gm, node) is not None:
                self.bn_owners[scope_of([node])] += 1

    def reached_otherwise(self, path: str, own_forward: bool = False) -> bool:
        """Whether a call of an ancestor runs ``path``, a part of it is called, or a node fetches one of its tensors.

        With ``own_forward``, fetches and calls made inside ``path``'s own forward (a module reading its own
        buffers, calling its activation) are allowed.
        """
        ancestors = {path.rsplit(".", i)[0] for i in range(1, path.count(".") + 1)}
        if any(self.calls[a] for a in ancestors):
            return True
        for target, scope in self.fetches + self.part_calls:
            inside = own_forward and within(scope, path)
            if target.startswith(path + ".") and not inside:
                return True
        return False

    def enclosing(self, scope: str) -> str:
        """The smallest module holding ``scope`` and every forward that calls or fetches one of its parts.

        Generated code replaces a module as a whole: a forward kept as written that indexes, iterates or calls a
        part of it (``self.seq0[0](x)``) must be inside the module replaced, or it would reach into generated code.
        """
        while scope:
            parts = self.fetches + self.part_calls
            readers = [s for t, s in parts if t.startswith(scope + ".") and not within(s, scope)]
            if not readers:
                return scope
            scope = common_scope([scope, *readers])
        return scope


class _Engine:
    """Fuses one module tree: traced regions, their rewrites, and every module replacement made (``units``)."""

    def __init__(self, passes: dict[str, Any], leaf_types: tuple[type, ...], form: Form, report: FusionReport):
        self.passes = passes
        self.leaf_types = leaf_types
        self.form = form
        self.checked = False  # whether the self-check on example inputs will look at the result
        self.report = report
        self.units: list[_Unit] = []
        self.groups = 0
        # Paths of untraced (or opaque) modules whose own code reaches into the region being fused: what a rewrite
        # there changes is also read by that code, so the self-check runs the outermost of them.
        self.readers: list[str] = []
        # The model and its example inputs, whose forward tells what each part receives (see seen_inputs).
        self.example: tuple[nn.Module, tuple[Any, ...]] | None = None
        self.instances: Counter[int] = Counter()  # how many paths hold each module object
        # That example forward, recorded for the self-check, which then needs no forward of its own to record.
        self.recording: Recording | None = None

    @functools.cached_property
    def seen_inputs(self) -> dict[str, tuple[Any, ...]]:
        """What each module received on the example forward (see :func:`inputs_seen`): ranks for the parts
        traced apart. Run once, and only when a part is traced apart (a model traced whole costs no forward)."""
        if self.example is None:
            return {}
        seen, self.recording = _probe(*self.example, record=self.checked)
        return seen

    # -- regions

    def fuse_region(
        self, module: nn.Module, path: str, example_inputs: Sequence[Any] | None, *, below_untraced: bool
    ) -> nn.Module:
        """Fuse ``module`` (at ``path`` in the model); returns it, changed in place, or its replacement."""
        hint = example_inputs if example_inputs is not None else self.seen_inputs.get(path)
        container = type(module).forward is nn.Module.forward  # ModuleList, ModuleDict: nothing to trace
        traced = TraceResult(None, error="no forward") if container else trace(module, self.leaf_types)
        gm = traced.graph_module
        if gm is None:
            chained: set[str] = set()
            if not container:
                self.report.untraced.append(Untraced(path or "<model>", traced.error))
                chained = self._fold_chained_children(module, path)
            reached = _reached_into(module)
            for name, child in list(module.named_children()):
                child_path = _join(path, name)
                if name in chained:
                    continue
                if is_batch_norm_module(child):
                    why = f"its parent '{path or '<model>'}' could not be traced"
                    if container:
                        why = f"it is called from outside its container '{path or '<model>'}', which was not traced"
                    self.report.skipped.append(Skipped(child_path, why))
                elif name in reached and not self.checked and contains_batch_norm(child):
                    # Untraced code that indexes, iterates or reads into a child may call its layers directly: a
                    # fold there is exact only if those calls agree, which only the self-check can see.
                    why = (
                        f"the untraced '{path or '<model>'}' reaches into '{child_path}' (indexes, iterates or reads "
                        "its parts); pass example_inputs so that fuse can check folds there"
                    )
                    self.report.skipped += [Skipped(_join(child_path, n), why) for n in _batch_norm_paths(child)]
                elif contains_batch_norm(child) and not _is_torch_leaf(child):
                    with self._read_by(path if name in reached else None):
                        new = self.fuse_region(child, child_path, None, below_untraced=True)
                        self._replace(module, name, new, child_path)
            return module
        self.report.traced.append(path or "<model>")
        sites = _Sites(gm)
        originals = dict(module.named_modules(remove_duplicate=False))
        with deferred(gm, lambda: hint):
            run = run_passes(gm, self.passes)
        if self.form == "graph" and not path:
            result: nn.Module = _finish(gm)
            self.report.merge(_report_of(run), path)
            self._replace(None, "", result, "", old=module)
        else:
            result = self._write_back(module, path, gm, run, sites, originals, hint, below_untraced)
        # Parts kept as single calls (untraceable, or hooked) are fused on their own.
        for name in sorted({*traced.opaque, *traced.hooked}):
            sub = find_module(result, name)
            opaque = name in traced.opaque
            if sub is None or not contains_batch_norm(sub):
                if opaque:
                    self.report.untraced.append(Untraced(_join(path, name), traced.opaque[name]))
                continue
            # The traced code around it may call or fetch its parts too (``self.blk.conv(x)`` beside ``self.blk(x)``).
            with self._read_by(path if sites.reached_otherwise(name) else None):
                new = self.fuse_region(sub, _join(path, name), None, below_untraced=opaque)
                parent, _, last = name.rpartition(".")
                self._replace(find_module(result, parent), last, new, _join(path, name))
        return result

    @contextlib.contextmanager
    def _read_by(self, reader: str | None) -> Any:
        """Within it, rewrites are also read by the module at ``reader`` (``None``: by nothing more)."""
        if reader is not None:
            self.readers.append(reader)
        try:
            yield
        finally:
            if reader is not None:
                self.readers.pop()

    def _fold_chained_children(self, module: nn.Module, path: str) -> set[str]:
        """Fold each BatchNorm child of the untraced ``module`` that its code provably calls on the output of a
        conv child alone (:func:`~fx_lightning.fusion.padded_conv.chained_children`); returns the names of both."""
        done: set[str] = set()
        fold = {k: v for k, v in self.passes.items() if k == "fold_bn_into_preceding"}
        for first, second in chained_children(type(module)):
            layer, bn = module._modules.get(first), module._modules.get(second)
            if layer is None or bn is None or not is_batch_norm_module(bn) or not fold or done & {first, second}:
                continue
            if self.instances[id(layer)] != 1 or self.instances[id(bn)] != 1:
                continue  # also reachable at another path, whose code was not proven
            pair = nn.Sequential(collections.OrderedDict([(first, layer), (second, bn)]))
            traced = trace(pair, self.leaf_types)
            gm = traced.graph_module
            if gm is None or traced.opaque or traced.hooked:
                continue
            with deferred(gm, lambda: self.seen_inputs.get(_join(path, first))):
                run = run_passes(gm, fold)
            records = [r for w in run.changes.rewrites for r in w.records]
            if run.left or len(records) != 1 or not isinstance(records[0], Folded):
                continue
            new = gm.get_submodule(first)
            if records[0].layers != (first,) or new is layer:
                continue
            group = self._new_group()
            # the untraced module's forward chains the two: the self-check runs it as a whole
            self._replace(module, first, new, _join(path, first), group=group, scope=path)
            self._replace(module, second, _identity_for(bn), _join(path, second), group=group, scope=path)
            record = replace(records[0], in_place=True, writable=False)
            self.report.merge(FusionReport(folded=[record]), path)
            done |= {first, second}
        return done

    def _write_back(
        self,
        module: nn.Module,
        path: str,
        gm: fx.GraphModule,
        run: PassRun,
        sites: _Sites,
        originals: dict[str, nn.Module],
        example_inputs: Sequence[Any] | None,
        below_untraced: bool,
    ) -> nn.Module:
        """Write the rewrites of ``module``'s graph into ``module``: in place where they are module swaps,
        as generated code for the smallest enclosing module elsewhere."""
        scoped: dict[str, list[Rewrite]] = {}
        for rewrite in run.changes.rewrites:
            pass_through = self._tree_form(rewrite, sites, originals) if rewrite.swaps is not None else None
            if pass_through is None:
                scoped.setdefault(sites.enclosing(rewrite.scope), []).append(rewrite)
                continue
            group = self._new_group()
            for target, new in (rewrite.swaps or {}).items():
                replacement = pass_through.get(target) if new is PASS_THROUGH else new
                assert replacement is not None
                for alias in _aliases(originals, originals[target]):
                    parent, _, last = alias.rpartition(".")
                    self._replace(
                        module.get_submodule(parent),
                        last,
                        replacement,
                        _join(path, alias),
                        group=group,
                        scope=_join(path, rewrite.scope),
                    )
            for record in rewrite.records:
                if isinstance(record, Folded):
                    placed = _in_place(record, writable=not below_untraced)
                    self.report.merge(FusionReport(folded=[placed]), path)
            self.report.graphs += [_join(path, t) for t, m in pass_through.items() if isinstance(m, fx.GraphModule)]
        graphs, dropped = self._graph_scopes(module, scoped, below_untraced)
        inputs = functools.cache(lambda: _capture_inputs(module, graphs, example_inputs))
        result = module
        for scope, why in dropped.items():
            where = _join(path, scope) or "<model>"
            reason = f"folding it needs generated code for '{where}', which cannot replace that module: {why}"
            records = [r for rewrite in scoped[scope] for r in rewrite.records if isinstance(r, Folded)]
            self.report.skipped += [Skipped(_join(path, r.bn), reason) for r in records]
        for scope in graphs:
            sub = module.get_submodule(scope)
            built = self._graph_of(sub, _join(path, scope), lambda scope=scope: inputs().get(scope))
            if built is None:
                continue
            if not scope:
                self._replace(None, "", built, path, old=module)
                result = built
                continue
            for alias in _aliases(dict(module.named_modules(remove_duplicate=False)), sub):
                parent, _, last = alias.rpartition(".")
                self._replace(module.get_submodule(parent), last, built, _join(path, alias))
        built_paths = [_join(path, g) for g in graphs]
        # Modules inside a module that became generated code are inlined into it: only the outer one is listed.
        self.report.graphs = [g for g in self.report.graphs if not any(within(g, b) and g != b for b in built_paths)]
        # A fold written in place inside a module that then became generated code is no longer at its path.
        self.report.folded = [
            replace(r, in_place=False, writable=False) if r.in_place and any(_touches(p, r) for p in built_paths) else r
            for r in self.report.folded
        ]
        self.report.notes += _capped_note(run)
        left = [s for s in run.left if not any(within(scope_of([s.node]), g) for g in graphs)]
        self.report.skipped += [Skipped(_join(path, s.name), s.reason) for s in left]
        return result

    def _tree_form(
        self, rewrite: Rewrite, sites: _Sites, originals: dict[str, nn.Module]
    ) -> dict[str, nn.Module] | None:
        """The pass-through modules the rewrite's swaps need, or ``None`` when the swaps would not be exact.

        A swap is exact when the module at its path is still the one the pass rewrote, the graph calls it at
        exactly one site, and nothing else reaches it (a call of a module that contains it, a fetch of one of
        its tensors). The module is replaced at every path that holds it.
        """
        pass_through: dict[str, nn.Module] = {}
        for target, new in (rewrite.swaps or {}).items():
            obj = originals.get(target)
            if obj is None or (target in rewrite.seen and rewrite.seen[target] is not obj):
                return None
            aliases = _aliases(originals, obj)
            if new is PASS_THROUGH and not is_batch_norm_module(obj):
                # a module whose own forward calls F.batch_norm: one call, rebuilt without the BatchNorm
                if len(aliases) != 1 or sites.calls[target] or sites.bn_owners[target] != 1:
                    return None
                if sites.reached_otherwise(target, own_forward=True):
                    return None
                built = _without_batch_norm(obj, self.leaf_types)
                if built is None:
                    return None
                pass_through[target] = built
                continue
            if sum(sites.calls[a] for a in aliases) != 1 or any(sites.reached_otherwise(a) for a in aliases):
                return None
            if new is PASS_THROUGH:
                pass_through[target] = _identity_for(obj)
        return pass_through

    def _graph_scopes(
        self, module: nn.Module, scoped: dict[str, list[Rewrite]], below_untraced: bool
    ) -> tuple[list[str], dict[str, str]]:
        """The outermost scopes that become generated code, and why each refused scope cannot."""
        graphs: list[str] = []
        dropped: dict[str, str] = {}
        for scope in sorted(scoped, key=lambda s: (s.count(".") if s else -1, s)):
            if any(within(scope, g) for g in graphs):
                continue
            sub = module.get_submodule(scope)
            why = ""
            if has_forward_hooks(sub):
                why = "it has forward hooks, which generated code would drop"
            elif below_untraced and (not scope or isinstance(sub, _CONTAINERS)):
                # Untraced code around it may index or iterate it (self.seq[0], len(self.seq)) or reach into it.
                why = "an untraced module around it may index it or reach into it"
            if why:
                dropped[scope] = why
            else:
                graphs.append(scope)
        return graphs, dropped

    def _graph_of(self, module: nn.Module, path: str, inputs: Inputs) -> fx.GraphModule | None:
        """``module`` traced on its own and fused, as a ``GraphModule``; ``None`` when it cannot be traced alone.
        ``inputs()`` gives what it receives, for shapes the passes ask for."""
        traced = trace(module, self.leaf_types)
        gm = traced.graph_module
        if gm is None:
            self.report.notes.append(f"'{path or '<model>'}' could not be traced on its own: {traced.error}")
            return None
        with deferred(gm, inputs):
            run = run_passes(gm, self.passes)
        built = _finish(gm)
        self.report.merge(_report_of(run), path)
        self.report.graphs.append(path)
        return built

    def _new_group(self) -> int:
        self.groups += 1
        return self.groups

    def _replace(
        self,
        container: nn.Module | None,
        name: str,
        new: nn.Module,
        path: str,
        old: nn.Module | None = None,
        group: int | None = None,
        scope: str | None = None,
    ) -> None:
        """Put ``new`` at ``container._modules[name]`` and remember it (in ``group``, or a group of its own, checked
        by running the module at ``scope``, by default ``path`` itself); ``container=None`` stands for the model
        itself (replaced by returning ``new``), recorded only for the model's own root."""
        group = self._new_group() if group is None else group
        scope = self.readers[0] if self.readers else (path if scope is None else scope)
        if container is None:
            if not path and old is not None:
                self.units.append(_Unit(path, None, name, old, new, group, ""))
            return
        old = container._modules[name]
        if old is new:
            return
        unit = _Unit(path, container, name, old, new, group, scope)
        unit.set(True)
        self.units.append(unit)


# ----------------------------------------------------------------------------------------------- passes


def _report_of(run: PassRun) -> FusionReport:
    """The report of a graph used as generated code: every rewrite counts, and the BatchNorms left."""
    changes = run.changes
    report = FusionReport(folded=changes.folded, merged=changes.merged, removed=changes.removed)
    report.skipped = [Skipped(s.name, s.reason) for s in run.left]
    report.notes += _capped_note(run)
    return report


def _capped_note(run: PassRun) -> list[str]:
    if not run.capped:
        return []
    return [
        f"the passes still found rewrites after {run.rounds} rounds; stopped there (the result is exact, "
        "possibly not fully fused)"
    ]


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    install_direct_calls(gm)
    return gm


def _identity_for(bn: nn.Module) -> nn.Identity:
    """The ``nn.Identity`` that takes a folded BatchNorm's place, still showing the BatchNorm's tensors and settings.

    Code that reads ``self.bn.weight`` or ``self.bn.eps`` (a regulariser, a logger, an untraced parent) keeps
    working and reads the values it read before. They are plain attributes, not in the state dict: the fused
    network's ``state_dict()`` never holds statistics the fused computation does not apply.
    """
    identity = nn.Identity().eval()
    _keep_as_attributes(identity, bn, [*bn._parameters, *bn._buffers])
    for name in ("eps", "momentum", "num_features", "affine", "track_running_stats"):
        if name in bn.__dict__:
            identity.__dict__[name] = bn.__dict__[name]
    return identity


def _keep_as_attributes(module: nn.Module, source: nn.Module, names: list[str]) -> None:
    for name in names:
        value = source._parameters.get(name, source._buffers.get(name))
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
        module.__dict__[name] = value


def _without_batch_norm(module: nn.Module, leaf_types: tuple[type, ...]) -> fx.GraphModule | None:
    """``module``'s own forward with its one BatchNorm call, on its first input, made a pass-through.

    For modules that normalise and then do more (timm's ``BatchNormAct2d``: BatchNorm, Dropout, activation):
    after the BatchNorm is folded into the layer before, the rest must stay.
    """
    traced = trace(module, leaf_types)
    gm = traced.graph_module
    if gm is None or traced.opaque:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    calls = [bn for n in gm.graph.nodes if (bn := match_batch_norm(gm, n)) is not None]
    if len(calls) != 1 or not placeholders or calls[0].input is not placeholders[0]:
        return None
    if value_users(placeholders[0]) != [calls[0].node]:
        return None
    calls[0].node.replace_all_uses_with(placeholders[0])
    gm.graph.erase_node(calls[0].node)
    erase_dead_code(gm)
    # The BatchNorm's tensors stay readable but leave the state dict (see _identity_for).
    fetched = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    _keep_as_attributes(gm, gm, [n for n in [*gm._parameters, *gm._buffers] if n not in fetched])
    return _finish(gm)


def _capture_inputs(
    module: nn.Module, scopes: list[str], example_inputs: Sequence[Any] | None
) -> dict[str, tuple[Any, ...]]:
    """The positional inputs each scope's module gets when ``module`` runs on ``example_inputs``."""
    if example_inputs is None or not scopes:
        return {}
    captured: dict[str, tuple[Any, ...]] = {}
    handles = []
    for scope in scopes:
        sub = module.get_submodule(scope)

        def hook(_: nn.Module, args: tuple[Any, ...], scope: str = scope) -> None:
            captured.setdefault(scope, args)

        handles.append(sub.register_forward_pre_hook(hook))
    try:
        module(*example_inputs)
    except Exception:  # noqa: BLE001 - shapes only help; without them fewer ranks are known
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ----------------------------------------------------------------------------------------------- ranks


def inputs_seen(model: nn.Module, example_inputs: Sequence[Any]) -> dict[str, tuple[Any, ...]]:
    """The positional inputs each module holding a BatchNorm receives on one forward of ``model`` on
    ``example_inputs``, by path.

    A part traced apart from the model (under an untraced root, or kept whole by the trace around it) gets its
    tensor ranks from these, as the model does from ``example_inputs``. Only modules called with positional
    arguments alone, and with the same shapes at every call, are listed: for the others the ranks stay unknown.
    The forward runs on a copy, so that caches it fills stay out of the model that is traced.
    """
    return _probe(model, example_inputs, record=False)[0]


def _probe(
    model: nn.Module, example_inputs: Sequence[Any], *, record: bool
) -> tuple[dict[str, tuple[Any, ...]], Recording | None]:
    """:func:`inputs_seen`, and with ``record`` the same forward recorded for the self-check (``None`` when the
    model cannot run): the root and every module holding a BatchNorm are hooked, the scopes units usually have."""
    probe = detached_copy(model)
    paths: dict[int, list[str]] = {}
    layers: set[int] = set()  # conv and linear layers: only their input shapes are kept, as meta tensors
    for path, sub in probe.named_modules(remove_duplicate=False):
        if path and contains_batch_norm(sub) and not is_batch_norm_module(sub):
            paths.setdefault(id(sub), []).append(path)
        elif path and (plain_layer_family(sub) is not None or padded_conv_family(sub) is not None):
            paths.setdefault(id(sub), []).append(path)
            layers.add(id(sub))
    calls: dict[int, list[tuple[Any, ...] | None]] = {}

    def record_call(key: int, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if key in layers:
            args = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, args)
        calls.setdefault(key, []).append(None if kwargs else args)

    handles = [
        sub.register_forward_pre_hook(functools.partial(record_call, id(sub)), with_kwargs=True)
        for _, sub in probe.named_modules()
        if id(sub) in paths
    ]
    recording = Recording() if record else None
    if recording is not None:
        scopes = [p for p, sub in probe.named_modules(remove_duplicate=False) if not p or id(sub) in paths]
        handles += recording.hook(probe, [p for p in scopes if not p or id(find_module(probe, p)) not in layers])
    inputs = tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tuple(example_inputs))
    try:
        output = run_seeded(probe, inputs)
    except Exception:  # noqa: BLE001 - fuse runs the model once more and reports why it cannot run
        return {}, None
    finally:
        for handle in handles:
            handle.remove()
    if recording is not None:
        recording.keep(output, inputs)
    seen: dict[str, tuple[Any, ...]] = {}
    for key, args in calls.items():
        first = args[0]
        if first is None or any(a is None or _shapes(a) != _shapes(first) for a in args):
            continue
        for path in paths[key]:
            seen[path] = first
    return seen, recording


def _shapes(args: Any) -> tuple[Any, ...]:
    """The structure of ``args`` with each tensor's shape and dtype, and every other leaf as it is."""
    leaves, spec = tree_flatten(args)
    shown = [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in leaves]
    return (str(spec), tuple(shown))


# ----------------------------------------------------------------------------------------------- helpers


def _touches(path: str, record: Folded) -> bool:
    return any(within(p, path) or within(path, p) for p in (record.bn, *record.layers))


def _in_place(record: Folded, writable: bool) -> Folded:
    return replace(record, layers=record.layers or (record.into,), in_place=True, writable=writable)


def _aliases(originals: dict[str, nn.Module], obj: nn.Module) -> list[str]:
    return [p for p, m in originals.items() if m is obj and p]


def _reached_into(module: nn.Module) -> set[str]:
    """Names of ``module``'s children that its own code does more with than call them (all, without source).

    ``self.seq[0]``, ``for layer in self.seq``, ``len(self.seq)``, ``self.blk.bn.weight``: each reaches the
    child's parts, which may then run or be read outside the child's own forward.
    """
    children = set(module._modules)
    reached = _attributes_reached(type(module))
    return children if reached is None else children & reached


@functools.cache
def _attributes_reached(cls: type) -> frozenset[str] | None:
    """The ``self.<name>`` that the methods of ``cls`` (and the ``forward`` it inherits) read other than to call,
    test or compare.

    Read once per class (parsing source is slow: a model repeats a few classes many times), from each method's
    own source rather than the class's (which makes ``inspect`` parse the whole file). Base classes are not read
    (a library's model base class has hundreds of methods), except the ``forward`` that runs. ``None`` without
    source.
    """
    values = [v for name, v in vars(cls).items() if name != "__init__"]
    inherited = getattr(cls, "forward", None)
    if "forward" not in vars(cls) and not getattr(inherited, "__module__", "torch.").startswith("torch."):
        values.append(inherited)
    functions = []
    for value in values:
        fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        if inspect.isfunction(fn):
            functions.append(fn)
    nodes = []
    for fn in functions:
        tree = parsed_source(fn)
        if tree is None:
            return None
        nodes += list(ast.walk(tree))
    called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    # `self.x is None` and `isinstance(self.x, ...)` look at the child, not into it.
    called |= {
        id(n.left)
        for n in nodes
        if isinstance(n, ast.Compare) and all(isinstance(o, (ast.Is, ast.IsNot)) for o in n.ops)
    }
    called |= {
        id(n.args[0]) for n in nodes if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "isinstance" and n.args
    }
    reached = set()
    for node in nodes:
        on_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
        if on_self and isinstance(node.ctx, ast.Load) and id(node) not in called:
            reached.add(node.attr)
    return frozenset(reached)


def _batch_norm_paths(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if n and (is_batch_norm_module(m) or isinstance(m, _BatchNorm))]


def _is_torch_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn") and not isinstance(module, _CONTAINERS)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)

"""The self-check of :func:`fx_lightning.fuse`: each rewrite checked where it happens, on the example inputs.

One forward of the original on the example inputs records what each rewritten unit receives (its positional and
keyword inputs, the random state) and what it returns and leaves in its inputs. A unit is the smallest module whose
forward holds a rewrite and every reader of what it changed, so comparing that module's output and in-place effects,
as it was and as rewritten, sees there what a comparison of the whole model would. Units are checked outermost
first, with every rewrite inside applied, all in one forward of the fused model: each outermost unit is compared as
it returns (fed by the rewritten units before it, which differ from the original only by rounding), and the same
forward gives the whole model's output. When they agree (the usual case), the check costs that one forward beside
the recording one. Only a unit that disagrees is looked at closer: on its own recorded inputs, then its inner units
on their own, each of its own rewrites alone, and, where the model's dtype disagrees, a float64 copy of that unit
(never of the whole model), so that float rounding never reverts an exact rewrite. What fails is reverted, with a
reason naming the unit.

The whole model is compared once at the end: its relative error is reported (``FusionReport.max_rel_error``) where
every output is a floating tensor of fixed shape; there, a mismatch no unit explains means the analysis is wrong,
and the unfused copy is returned with the reason (and a warning). Outputs that are selections (labels, indices,
post-NMS detections whose counts vary) are not a verdict on the fused model: float rounding flips near ties.

Where the engine already ran the original once on the example inputs (to learn what each part traced apart
receives), that forward records for every module that could be a unit (see :class:`Recording`), and the self-check
reuses it instead of running the original a second time.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fx_lightning.errors import first_line
from fx_lightning.fusion.module_paths import common_scope, find_module, within
from fx_lightning.fusion.report import Folded, FusionReport, Skipped
from fx_lightning.trees import tree_to
from fx_lightning.verify.compare import Comparison, compare_trees, default_rtol

__all__ = ["Recording", "check_units", "run_example"]

#: The whole-model verdict allows this many times the per-unit relative bound of the model's dtype.
_WHOLE_MODEL_ULPS = 16


class Unit(Protocol):
    """A module replacement made in the fused copy (``fx_lightning.fusion.engine._Unit``)."""

    path: str
    container: nn.Module | None
    old: nn.Module
    new: nn.Module
    group: int
    scope: str

    def set(self, applied: bool) -> None: ...


@dataclass
class _Record:
    """What the module at one unit's scope received and did on its first call in the original's forward."""

    args: Any = None
    kwargs: Any = None
    rng: torch.Tensor | None = None
    output: Any = None
    after: Any = None  # (args, kwargs) after the call: what the module wrote into its inputs
    done: bool = False
    given: Any = None  # during the call: the (args, kwargs) the caller passed, before the module's own pre-hooks
    before: _Snapshot | None = None  # during the call: what ``given`` held before it


@dataclass
class Recording:
    """What one seeded forward of the original on the example inputs recorded, for a later self-check.

    Attributes:
        records: by module path, what that module received and returned on its first call; every path hooked is
            there, called or not (``done``), so a unit whose scope is among them needs no forward of its own.
        whole: the original's output, and its inputs after the forward.
    """

    records: dict[str, _Record] = field(default_factory=dict)
    whole: Any = None
    # During the forward: the copy made of each tensor, by id, with a weak reference to the tensor and its version
    # then. Nested modules hand the same tensors on (a block's input is its first layer's), so each is copied once
    # while it is unchanged.
    copies: dict[int, tuple[weakref.ref[torch.Tensor], int | None, torch.Tensor]] = field(default_factory=dict)

    def hook(self, model: nn.Module, paths: Sequence[str]) -> list[Any]:
        """Register the recording hooks on the module at each of ``paths`` of ``model``; returns their handles."""
        handles = []
        for path in paths:
            module = find_module(model, path)
            if module is None:
                continue
            record = self.records.setdefault(path, _Record())
            # First among the pre-hooks: the module's own may replace its inputs (and would again when it is run).
            handles.append(module.register_forward_pre_hook(self._pre_hook(record), with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(self._post_hook(record), with_kwargs=True))
        return handles

    def keep(self, output: Any, inputs: tuple[Any, ...]) -> None:
        """Keep the original's ``output`` and its ``inputs`` after the forward, as copies: the forward's tensors
        may be handed on (as the inputs a part receives) and written into later."""
        self.whole = (self._copy(output), (self._copy(inputs), {}))
        self.copies.clear()

    def _copy(self, tree: Any) -> Any:
        """``tree`` with each tensor copied, or the copy already made of it if it was not written into since."""

        def copied(t: torch.Tensor) -> torch.Tensor:
            seen = self.copies.get(id(t))
            version = _version(t)
            # Unchanged: the same tensor, no in-place write counted, and equal (a write through .data counts none).
            if (
                seen is not None
                and seen[0]() is t
                and version is not None
                and seen[1] == version
                and torch.equal(t, seen[2])
            ):
                return seen[2]
            copy = t.detach().clone()
            self.copies[id(t)] = (weakref.ref(t), version, copy)
            return copy

        return tree_map(lambda t: copied(t) if isinstance(t, torch.Tensor) else t, tree)

    def _pre_hook(self, record: _Record) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if record.args is None:
                record.args, record.kwargs = self._copy(args), self._copy(kwargs)
                record.rng = torch.get_rng_state()
                record.given = (args, kwargs)
                record.before = _Snapshot.of(record.given)

        return hook

    def _post_hook(self, record: _Record) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not record.done and record.given is not None and record.before is not None:
                # Inputs the call left as they were are the ones recorded before it (compared by identity later).
                unchanged = record.before.unchanged(record.given, (record.args, record.kwargs))
                after = (record.args, record.kwargs) if unchanged else self._copy(record.given)
                record.output, record.after, record.done = self._copy(output), after, True
                record.given = record.before = None

        return hook

    def covers(self, scopes: set[str]) -> bool:
        """Whether every one of ``scopes`` was hooked (so its record, or that it did not run, is known)."""
        return self.whole is not None and scopes <= self.records.keys()


@dataclass
class _Verdict:
    ok: bool
    why: str = ""


@dataclass
class _Check:
    """One self-check: the fused copy's units by group, and what one forward of the original recorded."""

    fused: nn.Module
    units: list[Unit]
    inputs: tuple[Any, ...]
    recording: Recording | None = None  # a forward of the original already recorded (see Recording)
    groups: dict[int, list[Unit]] = field(default_factory=dict)
    scopes: dict[int, str] = field(default_factory=dict)
    records: dict[str, _Record] = field(default_factory=dict)
    unchecked: set[int] = field(default_factory=set)
    reasons: dict[int, str] = field(default_factory=dict)
    whole: Any = None  # the original's output, and its inputs after the forward
    # The last run of the whole model (scope ""): the groups applied, and what it gave
    last_whole: tuple[frozenset[int], Any] | None = None

    def __post_init__(self) -> None:
        for unit in self.units:
            self.groups.setdefault(unit.group, []).append(unit)
        for group, units in self.groups.items():
            self.scopes[group] = common_scope([u.scope for u in units])
        self.root_unit = next((u for u in self.units if u.container is None), None)

    def configure(self, applied: set[int]) -> nn.Module:
        """Put the replacements of the ``applied`` groups in, take every other out; return the model's root."""
        for unit in reversed(self.units):
            unit.set(False)
        for unit in self.units:
            if unit.group in applied:
                unit.set(True)
        if self.root_unit is None:
            return self.fused
        return self.root_unit.new if self.root_unit.group in applied else self.root_unit.old

    # -- recording

    def record(self) -> None:
        """Run the original once on the example inputs, recording what each unit's scope receives and returns; or
        take those records from the forward already recorded, when it hooked every scope."""
        scopes = set(self.scopes.values())
        if self.recording is not None and self.recording.covers(scopes):
            self.whole = self.recording.whole
            self.records = {scope: r for scope, r in self.recording.records.items() if scope in scopes and r.done}
            return
        original = self.configure(set())
        recording = Recording()
        handles = recording.hook(original, sorted(scopes))
        self.records = recording.records
        try:
            inputs = _clone(self.inputs)
            output = run_example(original, inputs)
        finally:
            for handle in handles:
                handle.remove()
            recording.copies.clear()
        self.whole = (output, (inputs, {}))
        self.records = {scope: r for scope, r in self.records.items() if r.done}

    # -- checking

    def run(self, scope: str, applied: set[int], double: bool = False) -> tuple[Any, Any]:
        """The module at ``scope`` with the ``applied`` groups in, on what it received: (output, inputs after)."""
        record = self.records[scope]
        module = find_module(self.configure(applied), scope)
        if module is None:
            raise LookupError(f"no module at '{scope}' in the fused model")
        args, kwargs = _clone(record.args), _clone(record.kwargs)
        if double:
            module = copy.deepcopy(module).double()
            args, kwargs = tree_to(args, dtype=torch.float64), tree_to(kwargs, dtype=torch.float64)
        before = _Snapshot.of((args, kwargs))
        with torch.random.fork_rng(devices=[]):
            if record.rng is not None:
                torch.set_rng_state(record.rng)
            output = module.eval()(*args, **kwargs)
        if not double and before.unchanged((args, kwargs), (record.args, record.kwargs)):
            return output, (record.args, record.kwargs)  # inputs left as received (compared by identity)
        return output, (args, kwargs)

    def trial(self, scope: str, applied: set[int]) -> _Verdict:
        """Whether the module at ``scope`` computes what it computed before, with the ``applied`` groups in."""
        record = self.records[scope]
        try:
            got = self.run(scope, applied)
        except Exception as err:  # noqa: BLE001 - a rewritten unit that fails where the original ran is wrong
            return _Verdict(False, f"it raises {type(err).__name__}: {first_line(str(err))}")
        if not scope:
            self.last_whole = (frozenset(applied), got)
        comparison = compare_trees((record.output, record.after), got)
        if comparison.passed:
            return _Verdict(True)
        if not _has_float_below_64(record.output):
            return _Verdict(False, _describe(comparison))
        # Rounding in the model's dtype may flip a near tie (an argmax, a selection): float64 copies of this unit,
        # as it was and as rewritten, tell a wrong rewrite from rounding of a right one.
        try:
            want = self.run(scope, set(), double=True)
            got64 = self.run(scope, applied, double=True)
        except Exception as err:  # noqa: BLE001 - a unit that cannot run in float64 keeps the model-dtype verdict
            return _Verdict(False, f"{_describe(comparison)} (and it cannot run in float64: {type(err).__name__})")
        rtol = default_rtol(_float_dtype(record.output))
        again = compare_trees(want, got64, rtol=rtol)
        del want, got64
        if not gc.isenabled():
            gc.collect()  # the float64 copies of the unit sit in cycles (GraphModules), and fuse pauses the collector
        if again.passed:
            return _Verdict(True)
        return _Verdict(False, f"{_describe(again)} in float64")

    def together(self, tops: list[str], groups: list[int]) -> set[str]:
        """The ``tops`` that agree in one seeded run of the whole model with every one of ``groups`` in.

        Each top module is compared, as it returns, with what it returned and left in its inputs in the original's
        forward, within the same bound as on its own; only, it runs on what the rewritten modules before it gave,
        which differs from what it received by their rounding. When they all agree (the usual case), that one
        forward checks every unit and gives the whole model's output too; a top that does not agree, is not
        recorded, or is called around its hooks (by generated code) is checked on its own inputs after.
        """
        recorded = [t for t in tops if t in self.records]
        if not recorded or recorded == [""]:
            return set()  # the whole model alone: checking it on its own is this very run
        root = self.configure(set(groups))
        agreed: set[str] = set()
        checked: set[str] = set()
        given: dict[str, Any] = {}  # what the caller passed each top, on its first call

        def take(top: str) -> Any:
            def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                given.setdefault(top, (args, kwargs))

            return hook

        def compare(top: str) -> Any:
            def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                inputs = given.get(top)
                if inputs is not None and top not in checked:
                    checked.add(top)
                    record = self.records[top]
                    if compare_trees((record.output, record.after), (output, inputs)).passed:
                        agreed.add(top)

            return hook

        handles = []
        for top in recorded:
            module = find_module(root, top)
            if module is not None:
                handles.append(module.register_forward_pre_hook(take(top), with_kwargs=True, prepend=True))
                handles.append(module.register_forward_hook(compare(top), with_kwargs=True))
        inputs = _clone(self.inputs)
        try:
            output = run_seeded(root, inputs)
        except Exception:  # noqa: BLE001 - checked on its own, each unit says whether it is the one that raises
            return set()
        finally:
            for handle in handles:
                handle.remove()
        self.last_whole = (frozenset(groups), (output, (inputs, {})))
        return agreed

    def check(self, scope: str, groups: list[int]) -> set[int]:
        """The ``groups`` (all with scopes within ``scope``) that keep the module at ``scope`` as it was."""
        if scope not in self.records:
            # Not run on the example inputs: inner units that did run are checked on their own; the rest stay
            # unchecked, as a whole-model comparison could not see them either.
            accepted = self._inner(scope, groups)
            own = [g for g in groups if self.scopes[g] == scope]
            self.unchecked.update(own)
            return accepted | set(own)
        verdict = self.trial(scope, set(groups))
        if verdict.ok:
            return set(groups)
        accepted = self._inner(scope, groups)
        for group in (g for g in groups if self.scopes[g] == scope):
            alone = self.trial(scope, {group})
            if alone.ok:
                accepted.add(group)
            else:
                self.reasons[group] = f"'{scope or '<model>'}' changed with it: {alone.why}"
        own_kept = {g for g in accepted if self.scopes[g] == scope}
        if own_kept and not self.trial(scope, accepted).ok:
            for group in own_kept:
                self.reasons[group] = (
                    f"'{scope or '<model>'}' changed with it and the other rewrites there, though with it alone "
                    f"it did not: {verdict.why}"
                )
            accepted -= own_kept
        return accepted

    def _inner(self, scope: str, groups: list[int]) -> set[int]:
        inner = [g for g in groups if self.scopes[g] != scope]
        tops = _outermost({self.scopes[g] for g in inner})
        accepted: set[int] = set()
        for top in tops:
            accepted |= self.check(top, [g for g in inner if within(self.scopes[g], top)])
        return accepted


def check_units(
    fused: nn.Module,
    units: Sequence[Unit],
    inputs: tuple[Any, ...],
    report: FusionReport,
    recording: Recording | None = None,
) -> nn.Module:
    """Check every unit of ``fused`` on ``inputs``, revert those that fail, compare the whole model once.

    Args:
        fused: the fused copy with every unit applied (the root unit's ``new`` when the root was replaced).
        units: the module replacements made, in the order they were made.
        inputs: the example inputs.
        report: the fusion report, updated with what was reverted and why, and the whole-model figure.
        recording: a seeded forward of (a copy of) the original on ``inputs``, already recorded; used when it
            hooked the scope of every unit, else the original runs once more to record them.

    Returns:
        The fused model with the units that passed applied.
    """
    check = _Check(fused, list(units), inputs, recording)
    check.record()
    all_groups = list(check.groups)
    accepted: set[int] = set()
    tops = _outermost(set(check.scopes.values()))
    agreed = check.together(tops, all_groups)
    for top in tops:
        groups = [g for g in all_groups if within(check.scopes[g], top)]
        accepted |= set(groups) if top in agreed else check.check(top, groups)
    reverted = [g for g in all_groups if g not in accepted]
    if check.unchecked:
        paths = sorted({u.path or "<model>" for g in check.unchecked for u in check.groups[g]})
        report.notes.append(
            f"not checked: {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''} did not run on example_inputs"
        )
    result = check.configure(accepted)
    problem, figure = _whole_model(check, result, accepted)
    report.max_rel_error = figure
    if problem:
        # Every unit agreed, yet the whole model does not: its forward keeps state between calls, or a reader of some
        # rewrite lies outside its unit.
        why = (
            f"the fused model disagrees with the original on example_inputs although every rewritten unit agrees "
            f"({problem}): either the model's output is not a function of its inputs (state kept between calls, "
            "randomness outside torch's generator), or a rewrite has a reader outside the module checked for it, a "
            "bug in fx_lightning's analysis to report; the unfused copy is returned"
        )
        warnings.warn(f"fuse(): {why}", RuntimeWarning, stacklevel=3)
        report.notes.append(why)
        reverted = all_groups
        for group in all_groups:
            check.reasons.setdefault(group, why)
        result = check.configure(set())
        report.max_rel_error = None
    _report_reverted(report, check, reverted)
    return result


def _whole_model(check: _Check, result: nn.Module, applied: set[int]) -> tuple[str, float | None]:
    """What is wrong with the whole fused model ("" if nothing seen), and its max relative error where defined."""
    want = check.whole
    if not _all_float(want):
        return "", None  # selections (labels, post-NMS boxes) flip under rounding: not a verdict, not worth a forward
    if check.last_whole is not None and check.last_whole[0] == frozenset(applied):
        got = check.last_whole[1]  # the unit checked last was the whole model, as returned
    else:
        try:
            inputs = _clone(check.inputs)
            got = (run_seeded(result, inputs), (inputs, {}))
        except Exception as err:  # noqa: BLE001 - the original ran on these inputs
            return f"it raises {type(err).__name__}: {first_line(str(err))}", None
    # Rounding accumulates over a whole model (bfloat16 most of all): the verdict allows it, the figure shows it.
    comparison = compare_trees(want, got, rtol=_WHOLE_MODEL_ULPS * default_rtol(_float_dtype(want)))
    if comparison.structure:
        return comparison.structure, None
    continuous = all(not leaf.discrete and not leaf.varying for leaf in comparison.leaves) and _all_float(want)
    if not continuous:
        return "", None  # selections (labels, post-NMS boxes) flip under rounding: not a verdict
    if not comparison.passed:
        return _describe(comparison), comparison.max_rel
    return "", comparison.max_rel


def _report_reverted(report: FusionReport, check: _Check, reverted: list[int]) -> None:
    units = [u for g in reverted for u in check.groups[g]]
    paths = [u.path for u in units]
    report.reverted += paths
    for unit in units:
        report.reverted_reasons[unit.path or "<model>"] = check.reasons.get(unit.group, "")
    why_of = {u.path: check.reasons.get(u.group, "") for u in units}

    def reason(record: Folded) -> str:
        for path in paths:
            if _touches(path, record):
                return f"the self-check reverted '{path or '<model>'}': {why_of[path]}"
        return ""

    # A fold inside a reverted module stays where its own replacement (the layer, the BatchNorm) was kept: the
    # module reverted to holds it.
    kept_paths = {u.path for u in check.units if u.group not in set(reverted)}

    def undone(record: Folded) -> bool:
        own = {record.bn, *record.layers}
        return any(_touches(p, record) for p in paths) and not own & kept_paths

    kept = [r for r in report.folded if not undone(r)]
    report.skipped += [Skipped(r.bn, reason(r)) for r in report.folded if r not in kept]
    report.folded = kept
    report.merged = [m for m in report.merged if not any(within(m.into, p) for p in paths)]
    report.removed = [r for r in report.removed if not any(within(r.name, p) for p in paths)]
    report.graphs = [g for g in report.graphs if not any(within(g, p) for p in paths)]


# ----------------------------------------------------------------------------------------------- helpers


def run_example(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``module`` run seeded on the example ``inputs``; a ``ValueError`` saying so when it cannot run on them."""
    try:
        return run_seeded(module, inputs)
    except Exception as err:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        raise ValueError(
            f"fuse(example_inputs=...) could not run the model on inputs of shapes {shapes}: "
            f"{type(err).__name__}: {err}. Pass inputs the model's forward accepts, or leave example_inputs out."
        ) from err


def run_seeded(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return module.eval()(*inputs)


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter, which moves with every in-place write into it; ``None`` for an inference tensor."""
    return None if t.is_inference() else t._version


def _versions(leaves: list[Any]) -> list[int | None]:
    return [_version(t) if isinstance(t, torch.Tensor) else 0 for t in leaves]


@dataclass
class _Snapshot:
    """What a module's inputs held before a call: the structure, the objects in it, the tensors' version counters."""

    spec: Any
    leaves: list[Any]
    versions: list[int | None]

    @classmethod
    def of(cls, tree: Any) -> _Snapshot:
        leaves, spec = tree_flatten(tree)
        return cls(spec, leaves, _versions(leaves))

    def unchanged(self, tree: Any, copy: Any) -> bool:
        """Whether the call left ``tree`` as it was: the same structure holding the same objects (an element of a list
        replaced is a change), no in-place write counted, and every tensor equal to ``copy`` of it taken before the
        call (a write through ``.data`` or NumPy moves no counter)."""
        leaves, spec = tree_flatten(tree)
        if spec != self.spec or any(a is not b for a, b in zip(leaves, self.leaves)):
            return False
        versions = _versions(leaves)
        if None in versions or versions != self.versions:
            return False
        copies = tree_flatten(copy)[0]
        tensors = [(t, c) for t, c in zip(leaves, copies) if isinstance(t, torch.Tensor)]
        return len(copies) == len(leaves) and all(isinstance(c, torch.Tensor) and torch.equal(t, c) for t, c in tensors)


def _floats(tree: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    tree_map(lambda t: leaves.append(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else None, tree)
    return leaves


def _has_float_below_64(tree: Any) -> bool:
    return any(t.dtype != torch.float64 for t in _floats(tree))


def _float_dtype(tree: Any) -> torch.dtype:
    return next((t.dtype for t in _floats(tree) if t.dtype != torch.float64), torch.float64)


def _all_float(tree: Any) -> bool:
    output = tree[0]
    flags: list[bool] = []
    tree_map(lambda t: flags.append(isinstance(t, torch.Tensor) and t.is_floating_point()), output)
    return bool(flags) and all(flags)


def _describe(comparison: Comparison) -> str:
    return comparison.describe()


def _outermost(scopes: set[str]) -> list[str]:
    """The scopes not inside another of ``scopes``."""
    return sorted(s for s in scopes if not any(o != s and within(s, o) for o in scopes))


def _touches(path: str, record: Folded) -> bool:
    return any(within(p, path) or within(path, p) for p in (record.bn, *record.layers))

"""The pass manager: run graph passes in order until none applies, and say what they changed and what they left.

Modelled on torch.fx's ``passes/infra/pass_manager.py``: the passes run in a fixed order, each returns what it
changed (:class:`~fx_lightning.fusion.passes.rewriting.PassChanges`), and a pass that raises is named in the error
(:class:`PassError`), with the node it was rewriting where that is known.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from fx_lightning.fusion.passes.matching import match_batch_norm
from fx_lightning.fusion.passes.rewriting import PassChanges, erase_dead_code

#: A graph pass: rewrites the graph in place and returns what it changed.
GraphPass = Callable[[fx.GraphModule], PassChanges]

#: How many times the passes are repeated at most; one rewrite can enable another (a merged conv followed by a
#: BatchNorm or a constant scale), so they run again until a round changes nothing.
MAX_ROUNDS = 8

#: The reason given for a BatchNorm left in the graph that no pass said anything about.
NO_PASS_APPLIES = "no fusion pass applies to it"


@dataclass
class LeftBatchNorm:
    """A BatchNorm call still in the graph after the passes, and why none of them folded it."""

    node: fx.Node
    name: str
    reason: str


@dataclass
class PassRun:
    """What the passes did to one graph, over every round.

    Attributes:
        changes: every rewrite made, in the order made, and for each BatchNorm call left alone the reasons the
            passes gave in the last round (the one that saw the final graph), joined by ``"; "``.
        left: the BatchNorm calls still in the graph, in graph order, each with its reason.
        rounds: how many rounds ran.
        capped: whether the last of :data:`MAX_ROUNDS` rounds still changed the graph (the result is exact, but
            possibly not fully fused).
    """

    changes: PassChanges = field(default_factory=PassChanges)
    left: list[LeftBatchNorm] = field(default_factory=list)
    rounds: int = 0
    capped: bool = False


class PassError(RuntimeError):
    """A graph pass raised: names the pass and, where known, the node it was rewriting; the cause is chained.

    Attributes:
        pass_name: the registered name of the pass.
        node: the graph node the pass held when it raised, or ``None`` when that is not known.
    """

    def __init__(self, message: str, pass_name: str, node: fx.Node | None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


def run_passes(gm: fx.GraphModule, passes: Mapping[str, GraphPass]) -> PassRun:
    """Run ``passes`` in order over ``gm`` until a round changes nothing, at most :data:`MAX_ROUNDS` rounds.

    After each pass that changed the graph, code nothing reads any more is erased
    (:func:`~fx_lightning.fusion.passes.rewriting.erase_dead_code`).

    Args:
        gm: the graph to rewrite, in place.
        passes: name -> pass, in the order they run (see :func:`fx_lightning.fusion.passes.registered_passes`).

    Returns:
        The :class:`PassRun`: the rewrites, the BatchNorm calls left and why, whether the round cap was hit.

    Raises:
        PassError: if a pass raises; the original exception is its ``__cause__``.
        TypeError: if a pass returns something other than a ``PassChanges``.

    Example:
        >>> from torch import nn
        >>> from fx_lightning.fusion.passes import registered_passes
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval())
        >>> run = run_passes(gm, registered_passes())
        >>> len(run.changes.folded), run.left, run.rounds, run.capped
        (1, [], 2, False)
    """
    run = PassRun(capped=True)
    # A pass is run again only when the graph changed since it last ran and found nothing: on the same graph it
    # would find nothing again. Its reasons from that run are the ones it would give on the final graph.
    changes = 0
    seen: dict[str, int] = {}  # pass -> the number of changes when it last ran and changed nothing
    last_reasons: dict[str, dict[str, str]] = {}
    for _ in range(MAX_ROUNDS):
        run.rounds += 1
        changed = False
        for name, fn in passes.items():
            if seen.get(name) == changes:
                continue
            result = run_pass(gm, name, fn, passes)
            run.changes.rewrites += result.rewrites
            last_reasons[name] = result.reasons
            if result.modified:
                erase_dead_code(gm)
                changed = True
                changes += 1
            else:
                seen[name] = changes
        if not changed:
            run.capped = False
            break
    reasons: dict[str, list[str]] = {}
    for name in passes:  # in pass order, as one round over the final graph would give them
        for node_name, reason in last_reasons.get(name, {}).items():
            if reason not in reasons.setdefault(node_name, []):
                reasons[node_name].append(reason)
    run.changes.reasons = {node_name: "; ".join(why) for node_name, why in reasons.items()}
    for node in gm.graph.nodes:
        bn = match_batch_norm(gm, node)
        if bn is not None:
            run.left.append(LeftBatchNorm(node, bn.name, run.changes.reasons.get(node.name) or NO_PASS_APPLIES))
    return run


def run_pass(
    gm: fx.GraphModule, name: str, fn: GraphPass, passes: Mapping[str, GraphPass] | None = None
) -> PassChanges:
    """Run one pass, registered as ``name``, over ``gm`` and return what it changed.

    Args:
        gm: the graph to rewrite, in place.
        name: the pass's registered name, used in errors.
        fn: the pass.
        passes: the passes run with it, named in the error's fix (``fuse(..., passes=[the others])``).

    Raises:
        PassError: if ``fn`` raises, naming ``name`` and the node it was rewriting where that is known (the
            first graph node, or the ``.node`` of a match, held by the pass's own frame); chained to the error.
        TypeError: if ``fn`` returns something other than a ``PassChanges``.
    """
    try:
        result = fn(gm)
    except Exception as err:
        node = _node_in_traceback(err, fn, gm)
        where = f" while rewriting node {node.format_node()}" if node is not None else ""
        others = [other for other in (passes or {}) if other != name]
        raise PassError(
            f"graph pass {name!r} raised {type(err).__name__}{where}: {err}. A pass that cannot rewrite a pattern "
            f"should leave it and give the reason in its PassChanges.reasons. To fuse without this pass: "
            f"fuse(model, passes={others!r}).",
            name,
            node,
        ) from err
    if not isinstance(result, PassChanges):
        raise TypeError(
            f"graph pass {name!r} returned {type(result).__name__}, expected a PassChanges (its rewrites and its "
            "reasons). Return fx_lightning.fusion.passes.PassChanges(), filled with what the pass changed."
        )
    return result


def _node_in_traceback(err: BaseException, fn: Any, gm: fx.GraphModule) -> fx.Node | None:
    """The node the pass ``fn`` was working on when ``err`` was raised, read from ``fn``'s innermost frame.

    A pass walks the graph with a loop variable (``node``, ``root``, or a match such as a ``BatchNormCall``
    with a ``.node``); the first local of its frame that is (or holds) a node of ``gm`` is taken. ``None`` when
    ``fn`` is not a plain function or its frame holds no node.
    """
    code = getattr(inspect.unwrap(fn), "__code__", None)
    found: fx.Node | None = None
    tb = err.__traceback__
    while tb is not None:
        if code is not None and tb.tb_frame.f_code is code:
            found = _first_node(tb.tb_frame.f_locals.values(), gm) or found
        tb = tb.tb_next
    return found


def _first_node(values: Any, gm: fx.GraphModule) -> fx.Node | None:
    for value in values:
        node = value if isinstance(value, fx.Node) else getattr(value, "node", None)
        if isinstance(node, fx.Node) and node.graph is gm.graph:
            return node
    return None

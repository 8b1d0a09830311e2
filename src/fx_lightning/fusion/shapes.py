"""Tensor shapes of a traced graph, propagated from example inputs only when a pass asks for one.

Most folds need no shape: a ``BatchNorm2d`` accepts 4-D input only, so the rank of what it normalises is known
from its class. Shapes settle what the graph alone leaves open (``Linear`` + ``BatchNorm1d``, a functional
``batch_norm``, a view between a layer and its BatchNorm). Propagating them runs the graph through torch.fx's
interpreter, which costs about one forward of the traced module, so the engine only says where the inputs come
from while the passes run (:func:`deferred`), and the first question about a shape runs the propagation
(:func:`ensure`).
"""

from __future__ import annotations

import contextlib
import io
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["deferred", "ensure", "propagate"]

Inputs = Callable[[], Sequence[Any] | None]

# The graphs whose shapes are still to be propagated, with where their inputs come from.
_PENDING: weakref.WeakKeyDictionary[fx.GraphModule, Inputs] = weakref.WeakKeyDictionary()


def propagate(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """``ShapeProp(gm).propagate(*inputs)`` without the traceback it prints on a failure (which it raises)."""
    _PENDING.pop(gm, None)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*inputs)
    except RuntimeError as err:
        raise (err.__cause__ or err) from None


@contextlib.contextmanager
def deferred(gm: fx.GraphModule, inputs: Inputs) -> Iterator[None]:
    """Within it, the first :func:`ensure` of ``gm`` propagates shapes on ``inputs()`` (``None``: there are none).

    Leaving it forgets ``inputs``, which holds the example inputs and the modules they run through.
    """
    _PENDING[gm] = inputs
    try:
        yield
    finally:
        _PENDING.pop(gm, None)


def ensure(gm: fx.GraphModule) -> bool:
    """Propagate the shapes deferred for ``gm``, once; whether that happened now.

    The graph may have been rewritten since it was traced: every rewrite keeps it computing what it computed, so
    it runs on the same inputs. A propagation that fails leaves the shapes unknown (they only help: a fold whose
    rank stays unknown is not made).
    """
    source = _PENDING.pop(gm, None)
    if source is None:
        return False
    inputs = source()
    if inputs is None:
        return False
    with contextlib.suppress(Exception):
        propagate(gm, inputs)
        return True
    return False

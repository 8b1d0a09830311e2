"""The batches FuseOnExport verifies on: where they come from, how many of them, how each reaches the device, and
which part of a batch is the forward's input and which the target.

The data is the validation data by default (then the data of the loop about to run), capped by the Trainer's
``limit_*_batches`` for that loop and by ``max_verify_batches``, or the ``verify_dataloader`` the user gave. A
one-shot iterable (a generator) is read once, up to the cap, and kept, so that every fusion sees every batch.

:class:`InputBinding` maps a batch to the forward's input and to the target (``get_input``/``get_target``, or the
defaults, which bind several leading elements when the forward needs them); :func:`check_first_batch` tries it on
the first batch before training, so that a misconfiguration fails before the time is spent.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fx_lightning.lightning import compat
from fx_lightning.lightning.networks import Network, forward_of, networks_of, run_forward
from fx_lightning.lightning.options import FuseOptions
from fx_lightning.loaders import read_batches
from fx_lightning.verify.verifier import default_get_input, default_get_target

_OWN_LOOP = {"test": "test", "predict": "predict", "validate": "validate"}


@dataclass
class Batches:
    """Re-iterable batches for one verification.

    Attributes:
        source: where they come from: ``"val"``, ``"test"``, ``"predict"``, ``"validate"`` (the Trainer's
            dataloaders for that loop) or ``"given"`` (``verify_dataloader``).
        loaders: the dataloaders (or lists of batches), each iterated afresh by every pass.
        limits: the number of batches to take from each loader (``None``: all).
        max_batches: the number of batches to take in all (``None``: all).
    """

    source: str
    loaders: list[Iterable[Any]]
    limits: list[int | None]
    max_batches: int | None = None

    def __iter__(self) -> Iterator[Any]:
        chained = itertools.chain.from_iterable(
            loader if limit is None else itertools.islice(loader, limit)
            for loader, limit in zip(self.loaders, self.limits)
        )
        return chained if self.max_batches is None else itertools.islice(chained, self.max_batches)

    def __len__(self) -> int:
        total = 0
        for loader, limit in zip(self.loaders, self.limits):
            length = _length(loader)
            if length is None and limit is None:
                raise TypeError("the number of batches is unknown")
            total += min(x for x in (length, limit) if x is not None)
        return total if self.max_batches is None else min(total, self.max_batches)

    def first(self) -> Any:
        """The first batch (``None`` when there is none); the batches stay complete for the next pass."""
        return next(iter(self), None)

    def describe(self) -> str:
        """The source, and the cap when one applies: ``"val, 2 batch(es) (limit_val_batches)"``."""
        caps = [f"{n} batch(es) per loader" for n in {lim for lim in self.limits if lim is not None}]
        if self.max_batches is not None:
            caps.append(f"at most {self.max_batches} (max_verify_batches)")
        return ", ".join([self.source, *caps])


@dataclass
class OnDevice:
    """Batches mapped by ``prepare`` (the transfer to the module's device) as they are read, re-iterable as the
    batches are: every pass of a check reads them afresh."""

    batches: Iterable[Any]
    prepare: Callable[[Any], Any]

    def __iter__(self) -> Iterator[Any]:
        return (self.prepare(batch) for batch in self.batches)


def calibration_batches(loaders: Any, count: int) -> list[Any]:
    """The first ``count`` batches of the (first) training dataloader, read once, as the user's loader gives them
    (:func:`fx_lightning.loaders.read_batches`: the loader's own generator is put back as found)."""
    found = _as_list(loaders)
    return read_batches(found[0], count) if found else []


def verification_batches(trainer: Any, stage: str, given: Iterable[Any] | None, max_batches: int | None) -> Batches:
    """The batches to verify on before ``stage`` (``"fit"``, ``"test"``, ``"predict"``, ``"validate"``).

    ``given`` (``verify_dataloader``) wins; otherwise the validation data, then the data of the loop about to
    run, each capped by the Trainer's ``limit_<loop>_batches``. No data: a :class:`Batches` with no loaders.
    """
    if given is not None:
        return Batches("given", [given], [None], max_batches)
    loops = ["val"] + ([_OWN_LOOP[stage]] if stage in _OWN_LOOP else [])
    for loop in loops:
        loaders = _as_list(compat.unsharded_dataloaders(trainer, loop))
        if loaders:
            limits = [_cap(compat.batch_limit(trainer, loop, _length(x)), _length(x)) for x in loaders]
            return Batches(loop, loaders, limits, max_batches)
    return Batches("none", [], [], max_batches)


def keep_one_shot(given: Iterable[Any] | None, max_batches: int | None) -> Iterable[Any] | None:
    """``given`` itself when it can be iterated again (a DataLoader, a list); a one-shot iterable (a generator, an
    iterator) read once into a list of at most ``max_batches`` batches, so that peeking at it loses nothing."""
    if not isinstance(given, Iterator):
        return given
    return list(given if max_batches is None else itertools.islice(given, max_batches))


def to_device(trainer: Any, pl_module: Any, batch: Any) -> Any:
    """Prepare a batch as Lightning's loops do: precision conversion, the transfer hooks, the device."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = compat.before_batch_transfer(pl_module, batch)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def _as_list(loaders: Any) -> list[Iterable[Any]]:
    """Lightning's multi-loader forms (a loader, a list/tuple/dict of loaders) as a list of loaders."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def _cap(limit: int | None, length: int | None) -> int | None:
    """The limit when it takes fewer batches than the loader has, else ``None`` (no cap)."""
    return None if limit is None or (length is not None and limit >= length) else limit


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


# ----------------------------------------------------------------------------------------- input and target


@dataclass
class InputBinding:
    """How a batch is split into the forward's input and the metric's target.

    ``get_input``/``get_target`` win; without ``get_input``, :meth:`bind` may decide that a tuple/list batch's
    leading elements are the input (``forward(x, mask)`` with ``(x, mask, y)`` batches), the target then the
    element after them.

    Attributes:
        get_input: the user's function, or ``None`` for :func:`~fx_lightning.verify.verifier.default_get_input`.
        get_target: the user's function, or ``None`` for the default.
        leading: how many leading elements of a tuple/list batch the input takes (``None``: the default rule).
    """

    get_input: Callable[[Any], Any] | None = None
    get_target: Callable[[Any], Any] | None = None
    leading: int | None = None

    def bind(self, pl_module: Any, networks: list[Network], batch: Any) -> str:
        """Decide :attr:`leading` on ``batch``; returns the note that says so, or ``""``."""
        self.leading = None
        fn = forward_of(pl_module, networks)
        if self.get_input is not None or batch is None or fn is None:
            return ""
        count = leading_inputs(fn, batch, with_target=self.get_target is None)
        if count is None:
            return ""
        self.leading = count
        names = ", ".join(list(inspect.signature(fn).parameters)[:count])
        owner = type(getattr(fn, "__self__", fn)).__name__
        target = f"target: element {count}" if self.get_target is None else "target: get_target"
        return (
            f"input: elements 0-{count - 1} of each batch (a {type(batch).__name__} of {len(batch)}) passed to "
            f"{owner}.forward({names}), whose first argument alone does not take element 0; {target}. Pass "
            "get_input=/get_target= to choose otherwise"
        )

    def input_of(self, batch: Any) -> Any:
        """The forward's input in ``batch``."""
        if self.get_input is None and self.leading is not None and isinstance(batch, (tuple, list)):
            return tuple(batch[: self.leading])
        return (self.get_input or default_get_input)(batch)

    def target_of(self, batch: Any) -> Any:
        """The metric's target in ``batch`` (``None`` when it has none)."""
        if self.get_target is None and self.leading is not None and isinstance(batch, (tuple, list)):
            return batch[self.leading] if len(batch) > self.leading else None
        return (self.get_target or default_get_target)(batch)


def example_input(trainer: Any, pl_module: Any, given: Any, binding: InputBinding, first_batch: Any) -> Any:
    """The forward input for shape propagation and export: ``given`` (``example_input``), else the first batch's."""
    if given is not None:
        return to_device(trainer, pl_module, given)
    if first_batch is None:
        return None
    return binding.input_of(to_device(trainer, pl_module, first_batch))


def check_first_batch(trainer: Any, pl_module: Any, options: FuseOptions, stage: str) -> None:
    """Fail before training on what the first verification batch before ``stage`` shows: the input and target
    layout, the forward signature. Errors repeat ``FuseOnExport(get_input=...)``/``(get_target=...)`` and the batch.

    Raises:
        TypeError: if the forward cannot take the input the way it will be called (or what ``get_input``/
            ``get_target`` raised, with the batch named).
    """
    networks = networks_of(pl_module, options.attributes)
    if not networks:
        return
    batches = verification_batches(trainer, stage, options.verify_dataloader, options.max_verify_batches)
    batch = batches.first()
    given_example = options.example_input
    if batch is None and given_example is None:
        return
    binding = InputBinding(options.get_input, options.get_target)
    where = f"the first {batches.source} batch ({describe(batch)})"
    binding.bind(pl_module, networks, batch)
    if given_example is not None:
        x = given_example
    else:
        try:
            x = binding.input_of(to_device(trainer, pl_module, batch))
        except Exception as err:
            raise type(err)(
                f"FuseOnExport(get_input={callable_name(binding.get_input)}) could not take the network input "
                f"from {where}: {err}"
            ) from err
    if batch is not None and options.verify:
        try:
            binding.target_of(batch)
        except Exception as err:
            raise type(err)(
                f"FuseOnExport(get_target={callable_name(binding.get_target)}) could not take the target from "
                f"{where}: {err}"
            ) from err
    fn = forward_of(pl_module, networks)
    if fn is None:
        run_forward(pl_module, x, networks)  # raises the explanation
    else:
        check_signature(fn, x, where)


def check_signature(fn: Any, x: Any, where: str) -> None:
    """Raise a ``TypeError`` before training when ``fn`` cannot take ``x`` the way it will be called."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return
    if isinstance(x, tuple):
        shown, how = f"a tuple of {len(x)}", f"{len(x)} positional argument(s)"
        args, kwargs = x, {}
    elif isinstance(x, dict) and x and all(isinstance(k, str) for k in x):
        try:
            signature.bind(**x)
            return
        except TypeError:
            shown, how, args, kwargs = f"a dict with keys {sorted(x)}", "one argument", (x,), {}
    else:
        shown, how, args, kwargs = type(x).__name__, "one argument", (x,), {}
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        owner = getattr(fn, "__self__", fn)
        raise TypeError(
            f"FuseOnExport: {type(owner).__name__}.forward{signature} cannot take the input from {where}: get_input "
            f"returned {shown}, passed as {how} ({err}). Pass get_input=lambda batch: ... returning what forward "
            "takes: a tuple is unpacked into positional arguments, a dict into keyword arguments."
        ) from err


def leading_inputs(fn: Any, batch: Any, with_target: bool) -> int | None:
    """How many leading elements of a tuple/list ``batch`` ``fn`` takes as its required positional parameters, when
    its first element alone does not bind to ``fn`` (``None`` otherwise, or when they do not bind either). With
    ``with_target``, an element must be left after them for the target.

    Example:
        >>> def forward(x, mask, scale=1.0): ...
        >>> leading_inputs(forward, (1, 2, 3), with_target=True), leading_inputs(forward, (1, 2), with_target=True)
        (2, None)
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to bind to
        return None
    try:
        signature.bind(batch[0])
        return None  # the first element fits: the default rule stands
    except TypeError:
        pass
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    count = sum(p.kind in positional and p.default is p.empty for p in signature.parameters.values())
    if count < 2 or count > len(batch) - (1 if with_target else 0):
        return None
    try:
        signature.bind(*batch[:count])
    except TypeError:
        return None
    return count


def describe(batch: Any) -> str:
    """A batch in a few words, for messages.

    Example:
        >>> describe((torch.zeros(2, 3), torch.zeros(2))), describe({"x": 1}), describe(None)
        ('a tuple of 2', "a dict with keys ['x']", 'none')
    """
    if batch is None:
        return "none"
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return type(batch).__name__


def callable_name(fn: Any) -> str:
    return "None" if fn is None else getattr(fn, "__qualname__", type(fn).__name__)


def with_progress(trainer: Any, batches: Batches, desc: str) -> Iterable[Any]:
    """``batches`` behind a progress bar when the Trainer shows one (global rank zero)."""
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return batches
    from tqdm.auto import tqdm

    try:
        total: int | None = len(batches)
    except TypeError:
        total = None
    return tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True)

"""Which networks of a LightningModule get fused, and putting fused networks in place and back.

A :class:`Network` names one network of the LightningModule: a child (``"net"``), an entry of a
``ModuleDict``/``ModuleList`` child (``"nets.a"``, ``"heads.0"``), or the LightningModule's own layers
(:data:`SELF`, when its ``forward`` wires layers defined on itself). A network compiled with ``torch.compile`` is
fused behind the compiled wrapper and compiled again the same way.

A :class:`Swap` puts fused networks at their paths and puts the user's own objects back, as a context manager
or by :meth:`Swap.install` / :meth:`Swap.restore`. Nothing is stored on the user's module: the swaps in place are
kept in a weak registry, so :func:`is_fused` and :func:`restore_original` work from anywhere.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import prune

from fx_lightning.fusion.tracing import contains_batch_norm, is_batch_norm_module
from fx_lightning.lightning.compat import compiled_module, overrides_forward, recompile
from fx_lightning.verify.verifier import call_with_input

#: The name of the LightningModule's own layers as one network.
SELF = "self"
_CONTAINERS = (nn.ModuleDict, nn.ModuleList)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Swap] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Network:
    """One network of a LightningModule that FuseOnExport fuses.

    Attributes:
        name: how reports and file names call it: the attribute path, or :data:`SELF`.
        path: the attribute path on the LightningModule (``""`` for :data:`SELF`).
    """

    name: str
    path: str

    @property
    def is_self(self) -> bool:
        return not self.path

    def holder(self, pl_module: nn.Module) -> nn.Module:
        """What sits at the path: the network, or its ``torch.compile`` wrapper."""
        return get_path(pl_module, self.path)

    def module(self, pl_module: nn.Module) -> nn.Module:
        """The network as :func:`fx_lightning.fuse` takes it (the module behind ``torch.compile``)."""
        holder = self.holder(pl_module)
        return compiled_module(holder) or holder

    def state_prefix(self, pl_module: nn.Module) -> str:
        """The prefix of the network's keys in the LightningModule's ``state_dict()`` (``"net."``, ``""``)."""
        target = self.module(pl_module)
        for name, module in pl_module.named_modules():
            if module is target:
                return f"{name}." if name else ""
        raise LookupError(f"{self.name} is not a sub-module of {type(pl_module).__name__}")

    def file_stem(self) -> str:
        return "model" if self.is_self else self.name.replace(".", "_")


def find_networks(pl_module: nn.Module) -> list[Network]:
    """The networks to fuse when none are named: each child that contains a BatchNorm (the entries of
    ``ModuleDict``/``ModuleList`` children taken one by one), or the LightningModule itself when a layer of such a
    child is a bare torch layer (its own ``forward`` then wires them: a tutorial-style LightningModule).
    """
    found: list[Network] = []
    for name, child in pl_module.named_children():
        entries = list(child.named_children()) if isinstance(child, _CONTAINERS) else [("", child)]
        for entry, module in entries:
            inner = compiled_module(module) or module
            if not contains_batch_norm(inner):
                continue
            if is_batch_norm_module(inner):
                return [Network(SELF, "")]
            found.append(Network(f"{name}.{entry}" if entry else name, f"{name}.{entry}" if entry else name))
    return found


def named_network(pl_module: nn.Module, name: str) -> Network:
    """The network at an attribute path given by the user (``"self"`` for the LightningModule's own layers).

    Raises:
        ValueError: if there is no attribute at that path.
        TypeError: if the attribute is not an ``nn.Module``.
    """
    if name == SELF:
        return Network(SELF, "")
    try:
        value = get_path(pl_module, name)
    except AttributeError as err:
        children = [n for n, _ in pl_module.named_children()]
        raise ValueError(
            f"{type(pl_module).__name__} has no attribute {name!r}. Its direct children are {children}; name one of "
            f"them, '{SELF}' for the LightningModule's own layers, or attributes=None to find the networks."
        ) from err
    if not isinstance(value, nn.Module):
        raise TypeError(
            f"{type(pl_module).__name__}.{name} is a {type(value).__name__}, expected a torch.nn.Module. Name the "
            "network attribute, e.g. 'net'."
        )
    return Network(name, name)


def networks_of(pl_module: nn.Module, attributes: list[str] | None) -> list[Network]:
    """The networks to fuse: the ones ``attributes`` names (:func:`named_network`), or those found
    (:func:`find_networks`) when it is ``None``.

    Raises:
        ValueError: if a name has no attribute behind it (the message repeats ``FuseOnExport(attributes=...)``).
        TypeError: if a name is not an ``nn.Module``.
    """
    if attributes is None:
        return find_networks(pl_module)
    try:
        return [named_network(pl_module, name) for name in attributes]
    except (ValueError, TypeError) as err:
        raise type(err)(f"FuseOnExport(attributes={attributes!r}): {err}") from err


def forward_of(pl_module: nn.Module, networks: list[Network]) -> Any:
    """The function that maps a batch's input to the outputs the metric scores: the LightningModule's own
    ``forward``; without one, the single network's; ``None`` when neither applies."""
    if overrides_forward(pl_module):
        return pl_module.forward
    if len(networks) == 1 and not networks[0].is_self:
        return networks[0].holder(pl_module).forward
    return None


def run_forward(pl_module: nn.Module, x: Any, networks: list[Network]) -> Any:
    """The LightningModule's forward on ``x`` (a tuple unpacked, a dict as keywords); without a ``forward`` of its
    own, the one network's.

    Raises:
        ValueError: if the LightningModule has no ``forward`` and several networks (or its own layers) are fused.
    """
    if overrides_forward(pl_module):
        return call_with_input(pl_module, x)
    if len(networks) == 1 and not networks[0].is_self:
        return call_with_input(networks[0].holder(pl_module), x)
    raise ValueError(
        f"FuseOnExport(attributes={[n.name for n in networks]!r}) needs {type(pl_module).__name__}.forward to "
        "compare the original and fused networks: define forward(), or fuse a single network with "
        "attributes=['net']."
    )


def replacements(pl_module: nn.Module, network: Network, fused: nn.Module) -> dict[str, nn.Module]:
    """What to put where so that ``pl_module`` runs ``fused`` in place of ``network``: attribute path -> module.

    For :data:`SELF`, ``fused`` is a fused copy of the LightningModule: the children it changed are swapped in.
    A compiled network gets ``fused`` compiled the same way.

    Raises:
        ValueError: if ``fused`` replaced the LightningModule by generated code, which cannot be swapped in.
    """
    if network.is_self:
        if type(fused) is not type(pl_module):
            raise ValueError(
                f"folding the layers of {type(pl_module).__name__} needs generated code for its own forward "
                f"(fuse returned a {type(fused).__name__}), which cannot be put into the LightningModule; name its "
                "networks with FuseOnExport(attributes=[...]) instead"
            )
        return changed_children(pl_module, fused)
    holder = network.holder(pl_module)
    compiled = compiled_module(holder)
    return {network.path: recompile(holder, fused) if compiled is not None else fused}


def pruned_tensors(module: nn.Module) -> list[tuple[str, str]]:
    """The ``(module path, tensor name)`` of every tensor pruned with ``torch.nn.utils.prune`` (as Lightning's
    ``ModelPruning`` leaves them with ``make_pruning_permanent=False``: ``weight_orig`` and ``weight_mask``)."""
    found: list[tuple[str, str]] = []
    for path, sub in module.named_modules():
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append((path, hook._tensor_name))
    return found


def without_pruning(module: nn.Module) -> nn.Module:
    """``module`` itself, or, when it holds pruned tensors, a copy with each pruned tensor made a plain parameter
    of its effective value (``weight_orig * weight_mask``): pruning's forward pre-hooks would block every fold."""
    pairs = pruned_tensors(module)
    if not pairs:
        return module
    plain = copy.deepcopy(module)
    for path, name in pairs:
        prune.remove(plain.get_submodule(path), name)
    return plain


def changed_children(original: nn.Module, fused: nn.Module) -> dict[str, nn.Module]:
    """The direct children of ``fused`` that differ from ``original``'s: another module class anywhere inside,
    other parameter names, or parameters that no longer share storage with the original's (folded weights)."""
    changed: dict[str, nn.Module] = {}
    for name, new in fused.named_children():
        old = original._modules.get(name)
        if old is None or _differs(old, new):
            changed[name] = new
    return changed


def _differs(old: nn.Module, new: nn.Module) -> bool:
    olds = dict(old.named_modules(remove_duplicate=False))
    news = dict(new.named_modules(remove_duplicate=False))
    if olds.keys() != news.keys():
        return True
    for path, module in news.items():
        before = olds[path]
        if type(module) is not type(before) or module._parameters.keys() != before._parameters.keys():
            return True
        for key, param in module._parameters.items():
            previous = before._parameters[key]
            if (param is None) != (previous is None):
                return True
            if param is not None and param.data_ptr() != previous.data_ptr():
                return True
    return False


class Swap:
    """Modules to put at attribute paths of a LightningModule, and the user's objects to put back.

    Use as a context manager (verification) or with :meth:`install` / :meth:`restore` around a loop. Installing
    twice, or restoring what is not installed, does nothing.
    """

    def __init__(self, pl_module: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.pl_module = pl_module
        self.modules = dict(modules)
        self._before: dict[str, nn.Module] | None = None
        self._outer: Swap | None = None

    @property
    def installed(self) -> bool:
        return self._before is not None

    def install(self) -> None:
        if self._before is not None:
            return
        self._before = {path: get_path(self.pl_module, path) for path in self.modules}
        try:
            for path, module in self.modules.items():
                set_path(self.pl_module, path, module)
        except BaseException:
            self.restore()
            raise
        self._outer = _ACTIVE.get(self.pl_module)
        _ACTIVE[self.pl_module] = self

    def restore(self) -> bool:
        """Put the user's objects back (moved to the device the swapped-in modules are on now)."""
        if self._before is None:
            return False
        for path, original in self._before.items():
            _align(original, get_path(self.pl_module, path))
            set_path(self.pl_module, path, original)
        self._before = None
        if _ACTIVE.get(self.pl_module) is self:
            # a temporary swap inside a loop's swap (verification) hands the registry back to the loop's
            if self._outer is not None and self._outer.installed:
                _ACTIVE[self.pl_module] = self._outer
            else:
                del _ACTIVE[self.pl_module]
        return True

    def __enter__(self) -> Swap:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def is_fused(pl_module: nn.Module) -> bool:
    """Whether fused networks are in place in ``pl_module`` (inside a step of a test/predict loop that FuseOnExport
    runs fused: between its ``on_*_batch_start`` and ``on_*_batch_end``)."""
    swap = _ACTIVE.get(pl_module)
    return swap is not None and swap.installed


def restore_original(pl_module: nn.Module) -> bool:
    """Put the user's own networks back into ``pl_module`` if fused ones are in place.

    Args:
        pl_module: a LightningModule (any ``nn.Module``) that :class:`~fx_lightning.FuseOnExport` may have fused.

    Returns:
        Whether anything was put back.
    """
    swap = _ACTIVE.get(pl_module)
    return swap.restore() if swap is not None else False


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_path(root, parent_path)
    setattr(parent, attr, module)


def parameters_and_buffers(module: nn.Module) -> Iterator[Any]:
    return itertools.chain(module.parameters(), module.buffers())


def _align(original: nn.Module, current: nn.Module) -> None:
    """Move ``original`` to the device of ``current``: the Trainer moves only the registered module."""
    current_tensor = next(parameters_and_buffers(current), None)
    original_tensor = next(parameters_and_buffers(original), None)
    if current_tensor is not None and original_tensor is not None and current_tensor.device != original_tensor.device:
        original.to(current_tensor.device)

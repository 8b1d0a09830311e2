"""One shape for every extension point: a name -> object table, kept in registration order.

The passes :func:`~fx_lightning.fuse` runs, the artifact formats and the int8 backends are each a
:class:`Registry`; adding one is one module and one ``register`` call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind, in the order they were registered (the order they run or are written in).

    Example:
        >>> formats = Registry[str]("format", "register_format")
        >>> formats.register("onnx", "ONNX Runtime")
        'ONNX Runtime'
        >>> list(formats)
        ['onnx']
    """

    def __init__(self, kind: str, register_call: str, unregister_call: str | None = None) -> None:
        self.kind = kind
        self.register_call = register_call
        self.unregister_call = unregister_call or f"{register_call}.unregister"
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` after those already registered; return it.

        Raises:
            ValueError: if ``name`` is taken.
        """
        if name in self._entries:
            raise ValueError(
                f"{self.register_call}({name!r}, ...) failed: a {self.kind} named {name!r} is already registered. "
                f"Registered: {list(self._entries)}. Choose another name."
            )
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry.

        Raises:
            KeyError: if nothing of that name is registered.
        """
        if name not in self._entries:
            raise KeyError(f"{self.unregister_call}({name!r}): no such {self.kind}. Registered: {list(self._entries)}.")
        return self._entries.pop(name)

    def as_dict(self) -> dict[str, T]:
        """A copy of the table, by name, in registration order."""
        return dict(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

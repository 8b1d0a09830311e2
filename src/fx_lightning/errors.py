"""Error text as the package's messages quote it: the first line of an upstream error.

At the bottom of the import graph (it imports nothing of the package), so that every layer can use it.
"""

from __future__ import annotations


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when the message is empty), or of a text (``""``
    when it is empty), cut to ``limit`` characters with ``"..."`` at the end when longer.

    Example:
        >>> first_line(ValueError("bad shape\\nTraceback ...")), first_line(KeyError()), first_line("")
        ('bad shape', 'KeyError', '')
        >>> first_line("a long line of text", limit=10)
        'a long ...'
    """
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ("" if isinstance(error, str) else type(error).__name__)
    if limit is not None and len(line) > limit:
        return line[: limit - 3] + "..."
    return line

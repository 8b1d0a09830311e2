"""fx_lightning.errors.first_line: the one line of an upstream error the package's messages quote."""

from __future__ import annotations

import pytest

from fx_lightning.errors import first_line


@pytest.mark.parametrize(
    ("error", "limit", "expected"),
    [
        (ValueError("shape mismatch\nTraceback (most recent call last): ..."), None, "shape mismatch"),
        (RuntimeError("  \n  leading blank lines\nsecond"), None, "leading blank lines"),
        (KeyError(), None, "KeyError"),  # an exception without a message: its type's name
        ("", None, ""),  # a text without a line: nothing
        ("x" * 200, 120, "x" * 117 + "..."),
        ("short", 120, "short"),
    ],
)
def test_first_line(error: BaseException | str, limit: int | None, expected: str) -> None:
    assert first_line(error, limit=limit) == expected

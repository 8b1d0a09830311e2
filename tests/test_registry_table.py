"""``fx_lightning.registry.Registry``: registration order, the errors for a taken or unknown name, the table's copy."""

from __future__ import annotations

import pytest

from fx_lightning.registry import Registry


def _table(*names: str) -> Registry[int]:
    table = Registry[int]("widget", "register_widget")
    for index, name in enumerate(names):
        table.register(name, index)
    return table


def test_registry_keeps_registration_order_not_name_order() -> None:
    table = _table("zeta", "alpha", "mu")
    assert list(table) == ["zeta", "alpha", "mu"]
    assert list(table.as_dict().items()) == [("zeta", 0), ("alpha", 1), ("mu", 2)]


def test_registry_register_returns_the_entry_and_getitem_finds_it() -> None:
    table = Registry[list[int]]("widget", "register_widget")
    entry = [1, 2]
    assert table.register("w", entry) is entry
    assert table["w"] is entry


def test_registry_getitem_of_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError, match="nope"):
        _table("a")["nope"]


def test_registry_contains_and_len() -> None:
    table = _table("a", "b")
    assert "a" in table
    assert "c" not in table
    assert 3 not in table  # any object may be asked about
    assert len(table) == 2
    assert len(Registry[int]("widget", "register_widget")) == 0


def test_registry_duplicate_name_raises_with_call_registered_names_and_fix() -> None:
    table = _table("a", "b")
    with pytest.raises(
        ValueError,
        match=r"^register_widget\('a', \.\.\.\) failed: a widget named 'a' is already registered\. "
        r"Registered: \['a', 'b'\]\. Choose another name\.$",
    ):
        table.register("a", 99)
    assert table["a"] == 0  # the first entry stays
    assert len(table) == 2


def test_registry_unregister_returns_the_entry_and_frees_the_name() -> None:
    table = _table("a", "b", "c")
    assert table.unregister("b") == 1
    assert list(table) == ["a", "c"]
    assert "b" not in table
    table.register("b", 7)  # the name can be taken again, and goes last
    assert list(table) == ["a", "c", "b"]


def test_registry_unregister_unknown_name_raises_with_default_call_name() -> None:
    table = _table("a")
    with pytest.raises(KeyError, match=r"register_widget\.unregister\('x'\): no such widget\. Registered: \['a'\]\."):
        table.unregister("x")


def test_registry_unregister_unknown_name_uses_the_given_unregister_call() -> None:
    table = Registry[int]("format", "register_exporter", "unregister_exporter")
    with pytest.raises(KeyError, match=r"unregister_exporter\('x'\): no such format\. Registered: \[\]\."):
        table.unregister("x")


def test_registry_as_dict_is_a_copy() -> None:
    table = _table("a", "b")
    copy = table.as_dict()
    copy["c"] = 5
    del copy["a"]
    assert list(table) == ["a", "b"]
    assert table.as_dict() == {"a": 0, "b": 1}
    assert table.as_dict() is not table.as_dict()


def test_registry_iteration_survives_changes_during_the_loop() -> None:
    # __iter__ walks a snapshot of the names, so unregistering while iterating does not raise.
    table = _table("a", "b", "c")
    seen = []
    for name in table:
        seen.append(name)
        table.unregister(name)
    assert seen == ["a", "b", "c"]
    assert len(table) == 0


def test_registry_keeps_its_kind_and_call_names() -> None:
    table = Registry[int]("pass", "register_pass")
    assert (table.kind, table.register_call, table.unregister_call) == (
        "pass",
        "register_pass",
        "register_pass.unregister",
    )

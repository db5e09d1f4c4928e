"""The generic Registry[T] used for scorers, filters and tasks."""

from __future__ import annotations

import pytest

from moeprune.errors import MoePruneError
from moeprune.registry import Registry


class Base:
    pass


class Child(Base):
    pass


def test_register_and_get_with_decorator():
    reg: Registry[type[Base]] = Registry("widget", base=Base)

    @reg.register("child")
    class Registered(Base):
        pass

    assert reg.get("child") is Registered
    assert "child" in reg and len(reg) == 1 and list(reg) == ["child"]


def test_type_check_rejects_wrong_class_and_instance():
    reg: Registry = Registry("widget", base=Base)
    with pytest.raises(TypeError, match="widget 'bad' must be a Base"):
        reg.register("bad", int)
    reg.register("instance", Child())
    with pytest.raises(TypeError):
        reg.register("bad_instance", 3)


def test_duplicate_name_is_an_error_unless_overwrite():
    reg: Registry = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    reg.register("a", 2, overwrite=True)
    assert reg.get("a") == 2


def test_unknown_name_is_a_one_line_moeprune_error_listing_available():
    reg: Registry = Registry("scorer")
    reg.register("exact_match", 1)
    reg.register("code_exec", 2)
    with pytest.raises(MoePruneError) as info:
        reg.get("exact")
    msg = str(info.value)
    assert msg == "unknown scorer 'exact'; available: code_exec, exact_match"
    assert "\n" not in msg and not isinstance(info.value, KeyError)


def test_lazy_entries_import_on_first_lookup_and_are_type_checked():
    import pathlib

    reg: Registry = Registry("thing", base=pathlib.PurePath)
    reg.register_lazy("path", "pathlib:Path")

    assert reg.get("path") is pathlib.Path
    reg.register_lazy("not_a_path", "os.path:join")
    with pytest.raises(TypeError):
        reg.get("not_a_path")


def test_freeze_refuses_new_entries():
    reg: Registry = Registry("thing")
    reg.freeze()
    with pytest.raises(RuntimeError, match="frozen"):
        reg.register("x", 1)

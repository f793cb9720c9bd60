"""Tests of raylab.registry: lookup by name, unknown and duplicate names."""

from __future__ import annotations

import pytest

from raylab import registry
from raylab.errors import RegistryError
from raylab.methods.skill import SkillConfig, SkillMethod


@pytest.fixture()
def isolated(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A copy of the registry, so test registrations do not leak into other tests."""
    registry._load_builtins()
    methods = dict(registry._METHODS)
    monkeypatch.setattr(registry, "_METHODS", methods)
    return methods


def test_get_method_skill() -> None:
    method = registry.get_method("skill")
    assert isinstance(method, SkillMethod)
    assert method.name == "skill"
    assert method.Config is SkillConfig
    assert "skill" in registry.list_methods()


def test_unknown_method_lists_known() -> None:
    with pytest.raises(RegistryError) as info:
        registry.get_method("nosuchmethod")
    message = str(info.value)
    assert message.startswith("unknown method 'nosuchmethod'; known methods: ")
    assert "skill" in message.split("known methods: ")[1].split(", ")


def test_duplicate_name_with_other_class_is_an_error(isolated: dict) -> None:
    class Impostor:
        pass

    with pytest.raises(RegistryError) as info:
        registry.register_method("skill")(Impostor)
    assert str(info.value).startswith("method 'skill' is already registered by ")
    assert "SkillMethod" in str(info.value)
    assert isolated["skill"] is SkillMethod  # the original stays


def test_reregistering_the_same_class_is_allowed(isolated: dict) -> None:
    assert registry.register_method("skill")(SkillMethod) is SkillMethod
    assert isolated["skill"] is SkillMethod


def test_new_name_registers_and_instantiates(isolated: dict) -> None:
    @registry.register_method("toy-method")
    class Toy:
        pass

    assert isinstance(registry.get_method("toy-method"), Toy)
    assert list(registry.list_methods()) == sorted(isolated)

"""Tests of raylab.registry: lookup by name, unknown and duplicate names."""

from __future__ import annotations

import pytest

from raylab import registry
from raylab.errors import RegistryError
from raylab.methods.skill import SkillConfig, SkillMethod


@pytest.fixture()
def isolated(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A copy of the registry, so test registrations do not leak into other tests."""
    registry.list_methods()
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
        name = "skill"

    with pytest.raises(RegistryError) as info:
        registry.register_method(Impostor)
    assert str(info.value).startswith("method 'skill' is already registered by ")
    assert "SkillMethod" in str(info.value)
    assert isolated["skill"] is SkillMethod  # the original stays


def test_reregistering_the_same_class_is_allowed(isolated: dict) -> None:
    assert registry.register_method(SkillMethod) is SkillMethod
    assert isolated["skill"] is SkillMethod


def test_new_name_registers_and_instantiates(isolated: dict) -> None:
    @registry.register_method
    class Toy:
        name = "toy-method"

    assert isinstance(registry.get_method("toy-method"), Toy)
    assert list(registry.list_methods()) == sorted(isolated)


def test_a_method_is_named_once_by_its_package() -> None:
    """The built-in methods are the packages under raylab/methods (found without importing
    them), each registering a class whose ``name`` is the package's name."""
    assert registry.method_names() == ["clear", "convnext", "detection", "dino", "minivit",
                                      "reuse", "skill", "stego"]
    for name, cls in registry.list_methods().items():
        assert cls.name == name and cls.__module__.startswith(f"raylab.methods.{name}.")


def test_a_class_without_a_name_is_refused(isolated: dict) -> None:
    class Nameless:
        pass

    with pytest.raises(RegistryError, match="has no method name"):
        registry.register_method(Nameless)


def test_get_method_imports_only_the_method_asked_for() -> None:
    """In a fresh interpreter, looking up ``skill`` imports no other method's package."""
    import ast
    import subprocess
    import sys

    code = ("import sys; from raylab.registry import get_method; get_method('skill'); "
            "print(sorted(m for m in sys.modules if m.startswith('raylab.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = {m.split(".")[2] for m in ast.literal_eval(out)}
    assert loaded <= {"skill", "base"}, loaded

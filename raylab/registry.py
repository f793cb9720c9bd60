"""The method registry: ``@register_method("skill")`` makes a method reachable by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from raylab.errors import RegistryError

_METHODS: dict[str, Any] = {}

# Modules imported on first lookup, so that `raylab methods` lists everything without the
# CLI having to import each method eagerly at start-up.
_BUILTIN_MODULES = ("raylab.methods.skill", "raylab.methods.convnext", "raylab.methods.dino",
                    "raylab.methods.clear")

T = TypeVar("T")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator registering a method under ``name``; duplicates are an error."""

    def decorate(obj: T) -> T:
        if name in _METHODS and _METHODS[name] is not obj:
            raise RegistryError(f"method {name!r} is already registered by {_METHODS[name]!r}")
        _METHODS[name] = obj
        return obj

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get_method(name: str) -> Any:
    """An instance of the method registered as ``name``; RegistryError lists the known ones."""
    _load_builtins()
    try:
        cls = _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise RegistryError(f"unknown method {name!r}; known methods: {known}") from None
    return cls() if isinstance(cls, type) else cls


def list_methods() -> dict[str, Any]:
    """All registered methods by name, sorted."""
    _load_builtins()
    return dict(sorted(_METHODS.items()))

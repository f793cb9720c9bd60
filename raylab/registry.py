"""The method registry: each package under ``raylab/methods`` registers one method.

A method's name is its package's name (``raylab/methods/skill`` is ``skill``), stated once:
the class's ``name`` attribute, which :func:`register_method` checks against the package.
:func:`get_method` imports only the package asked for; :func:`list_methods` imports all.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, TypeVar

from raylab.errors import RegistryError

_METHODS: dict[str, Any] = {}
METHODS_PACKAGE = "raylab.methods"

T = TypeVar("T")


def register_method(cls: T) -> T:
    """Class decorator registering a method under its ``name``; duplicates are an error."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{cls!r} has no method name (a class attribute `name`)")
    if name in _METHODS and _METHODS[name] is not cls:
        raise RegistryError(f"method {name!r} is already registered by {_METHODS[name]!r}")
    _METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    """The names of the built-in methods: the packages under ``raylab/methods`` (found
    without importing any of them)."""
    folder = Path(__file__).with_name("methods")
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if m.ispkg)


def _import(name: str) -> None:
    importlib.import_module(f"{METHODS_PACKAGE}.{name}")
    if name not in _METHODS:
        raise RegistryError(f"package {METHODS_PACKAGE}.{name} registers no method named "
                            f"{name!r}")


def get_method(name: str) -> Any:
    """An instance of the method registered as ``name``; RegistryError lists the known ones."""
    if name not in _METHODS:
        if name not in method_names():
            known = ", ".join(sorted(set(method_names()) | set(_METHODS))) or "none"
            raise RegistryError(f"unknown method {name!r}; known methods: {known}")
        _import(name)
    cls = _METHODS[name]
    return cls() if isinstance(cls, type) else cls


def list_methods() -> dict[str, Any]:
    """All methods by name, sorted (imports every method package)."""
    for name in method_names():
        if name not in _METHODS:
            _import(name)
    return dict(sorted(_METHODS.items()))


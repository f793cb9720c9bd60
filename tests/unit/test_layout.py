"""The package's shape, read from its imports with ``ast`` (every import, also those inside
functions): Ray only under ``raylab/runtime/``, layers that import downwards only, and no
import circles between modules. Each scanner is first shown to catch what it looks for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "raylab"

#: Bottom to top: a module may import its own layer and the layers below. ``registry``
#: only maps names to method packages, which it imports by name when asked.
LAYERS: list[set[str]] = [
    {"errors"},
    {"config", "registry"},
    {"engine"},
    {"data", "transforms", "losses", "metrics", "optim", "models", "continual", "plots"},
    {"runtime"},
    {"tasks", "curation"},
    {"methods"},
    {"api", "bench", "demo", "export"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports (absolute names; relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from raylab.engine import loop` imports the module raylab.engine.loop
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def package_modules() -> dict[str, set[str]]:
    """Module -> the raylab modules and third-party roots it imports."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        out[name] = imports_of(path.read_text(encoding="utf-8"), name,
                               path.name == "__init__.py")
    return out


def ray_imports(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Modules outside raylab.runtime that import Ray."""
    return {m: {i for i in imported if i == "ray" or i.startswith("ray.")}
            for m, imported in modules.items()
            if not m.startswith("raylab.runtime") and
            any(i == "ray" or i.startswith("ray.") for i in imported)}


def top(module: str) -> str:
    """``raylab.engine.loop`` -> ``engine``; ``raylab.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int:
    part = top(module)
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"{module}: package {part!r} is in no layer of LAYERS")


def upward_imports(modules: dict[str, set[str]]) -> list[str]:
    problems = []
    known = set(modules)
    for module, imported in modules.items():
        if module == "raylab":
            continue
        for target in imported:
            if target not in known or target == "raylab":
                continue
            if layer_of(target) > layer_of(module):
                problems.append(f"{module} imports {target} (layer {top(target)!r} is above "
                                f"{top(module)!r})")
    return problems


def circles(modules: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: sorted(i for i in imported if i in modules and i != m and i != "raylab")
             for m, imported in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


# ------------------------------------------------------------------ the scanners work


def test_scanner_sees_imports_inside_functions_and_relative_ones() -> None:
    source = ("import torch\n"
              "def f():\n"
              "    import ray.train\n"
              "    from ray.data.expressions import col\n"
              "from . import loop\n"
              "from .shards import Shard\n")
    found = imports_of(source, "raylab.engine.context")
    assert {"torch", "ray.train", "ray.data.expressions", "raylab.engine.loop",
            "raylab.engine.shards"} <= found
    assert ray_imports({"raylab.engine.context": found}) == {
        "raylab.engine.context": {"ray.train", "ray.data.expressions",
                                  "ray.data.expressions.col"}}
    assert ray_imports({"raylab.runtime.worker": found}) == {}


def test_scanners_catch_upward_imports_and_circles() -> None:
    modules = {"raylab.engine.loop": {"raylab.methods.base"},
               "raylab.methods.base": {"raylab.engine.loop"},
               "raylab.models.a": {"raylab.models.b"}, "raylab.models.b": {"raylab.models.a"}}
    assert upward_imports(modules) == ["raylab.engine.loop imports raylab.methods.base "
                                       "(layer 'methods' is above 'engine')"]
    assert circles(modules) == [["raylab.engine.loop", "raylab.methods.base"],
                                ["raylab.models.a", "raylab.models.b"]]


# ------------------------------------------------------------------ the package


@pytest.fixture(scope="module")
def modules() -> dict[str, set[str]]:
    found = package_modules()
    assert len(found) > 60, "the scan found too few modules to be meaningful"
    return found


def test_ray_is_imported_only_under_runtime(modules: dict[str, set[str]]) -> None:
    assert ray_imports(modules) == {}


def test_every_package_is_in_a_layer(modules: dict[str, set[str]]) -> None:
    for module in modules:
        if module != "raylab":
            layer_of(module)


def test_imports_run_downwards(modules: dict[str, set[str]]) -> None:
    assert upward_imports(modules) == []


def test_no_import_circles(modules: dict[str, set[str]]) -> None:
    assert circles(modules) == []

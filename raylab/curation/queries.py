"""The text queries of a curation: class names and the prompts whose CLIP embeddings
stand for each class.

A queries file (YAML)::

    templates: ["a photo of a {}.", "a blurry photo of a {}."]  # optional
    classes:
      bus:                 # no prompts of its own: every template with "bus"
      laptop: ["a photo of a laptop computer.", "a laptop on a desk."]

``classes`` may also be a plain list of names. Several prompts per class are averaged
(CLIP's prompt ensembling, which CLEAR's curation used). The background class is added by
the curation itself under :data:`BACKGROUND`, so no query may take that name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raylab.errors import ConfigError, DataError

BACKGROUND = "BACKGROUND"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_HINT = ("expected a YAML mapping with 'classes' (a list of names, or names mapped to "
         "lists of prompts) and optional 'templates' (strings with one '{}')")


@dataclass(frozen=True)
class Queries:
    """Class names in order and each class's prompts."""

    names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {n: list(p) for n, p in zip(self.names, self.prompts)}


def parse_queries(spec: Any, where: str = "queries") -> Queries:
    """Queries of a parsed YAML document.

    Raises:
        ConfigError: The structure is not the documented one (the offending key named).
    """
    if not isinstance(spec, dict) or "classes" not in spec:
        raise ConfigError(f"{where}: {_HINT}")
    unknown = sorted(set(spec) - {"classes", "templates"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; {_HINT}")
    templates = spec.get("templates", list(DEFAULT_TEMPLATES))
    if (not isinstance(templates, list) or not templates
            or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise ConfigError(f"{where}: templates: expected a non-empty list of strings with "
                          f"exactly one '{{}}' each, got {templates!r}")
    classes = spec["classes"]
    if isinstance(classes, list):
        if len({repr(c) for c in classes}) != len(classes):
            raise ConfigError(f"{where}: classes: a name is listed twice")
        classes = {name: None for name in classes}
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(f"{where}: classes: {_HINT}")
    names, prompts = [], []
    for name, own in classes.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ConfigError(f"{where}: classes: {name!r} is not a class name (a "
                              "non-empty string without surrounding spaces)")
        if name == BACKGROUND:
            raise ConfigError(f"{where}: classes: {BACKGROUND!r} is reserved for the "
                              "background class the curation adds")
        if own is None:
            own = [t.format(name) for t in templates]
        if (not isinstance(own, list) or not own
                or not all(isinstance(p, str) and p.strip() for p in own)):
            raise ConfigError(f"{where}: classes: {name}: expected a non-empty list of "
                              f"prompt strings (or nothing, for the templates), got {own!r}")
        names.append(name)
        prompts.append(tuple(own))
    return Queries(tuple(names), tuple(prompts))


def load_queries(path: str | os.PathLike) -> Queries:
    """Queries of a YAML file.

    Raises:
        DataError: The file is missing or not YAML (line given).
        ConfigError: The structure is not the documented one.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the queries file ({exc.__class__.__name__}); {_HINT}",
                        path=path) from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(f"not valid YAML ({getattr(exc, 'problem', None) or exc}); {_HINT}",
                        path=path, line=mark.line + 1 if mark else None) from None
    return parse_queries(spec, where=str(path))

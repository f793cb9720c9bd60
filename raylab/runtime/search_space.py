"""Search spaces written as text: ``--space window=[30,60,90] --space optim.lr=log(1e-4,1e-2)``.

Spec forms (values are YAML data, never evaluated):
  ``[a, b, c]``    categorical choice
  ``(lo, hi)``     uniform (floats) or integers lo..hi inclusive
  ``log(lo, hi)``  log-uniform (floats) or log-spaced integers lo..hi inclusive
  ``value``        a fixed value
Keys are the method config's dotted keys, so any trial re-runs as ``raylab train --set``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from raylab import config as cfglib
from raylab.errors import ConfigError

_RANGE = re.compile(r"^\s*(log)?\s*\(\s*([^,()]+)\s*,\s*([^,()]+)\s*\)\s*$")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # "choice" | "uniform" | "loguniform" | "int" | "logint" | "fixed"
    values: tuple[Any, ...]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "fixed":
            return self.values[0]
        lo, hi = self.values
        return {
            "uniform": lambda: tune.uniform(lo, hi),
            "loguniform": lambda: tune.loguniform(lo, hi),
            "int": lambda: tune.randint(lo, hi + 1),
            "logint": lambda: tune.lograndint(lo, hi + 1),
        }[self.kind]()


def _base_type(tp: Any) -> Any:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def parse_dimension(config_cls: type, key: str, spec: str) -> Dimension:
    """Parse one ``key=spec`` against the config class; errors name the key."""
    tp = cfglib.field_type(config_cls, key)
    match = _RANGE.match(spec)
    if match:
        log_scale, lo_text, hi_text = match.groups()
        lo, hi = cfglib.parse_value(lo_text), cfglib.parse_value(hi_text)
        base = _base_type(tp)
        if base not in (int, float):
            raise ConfigError(f"--space {key}: ranges need a numeric key, {key!r} is not")
        lo, hi = (cfglib._coerce(key, v, base) for v in (lo, hi))
        if not lo < hi:
            raise ConfigError(f"--space {key}={spec}: expected low < high")
        if log_scale and lo <= 0:
            raise ConfigError(f"--space {key}={spec}: log ranges need low > 0")
        if base is int:
            return Dimension(key, "logint" if log_scale else "int", (lo, hi))
        return Dimension(key, "loguniform" if log_scale else "uniform", (lo, hi))
    value = cfglib.parse_value(spec)
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"--space {key}: an empty list has nothing to choose from")
        # A list-typed key (e.g. model.channels) with a list of lists is a choice of lists.
        is_list_field = get_origin(_base_type(tp)) in (list, tuple)
        if is_list_field and not all(isinstance(v, list) for v in value):
            return Dimension(key, "fixed", (cfglib._coerce(key, value, tp),))
        return Dimension(key, "choice", tuple(cfglib._coerce(key, v, tp) for v in value))
    return Dimension(key, "fixed", (cfglib._coerce(key, value, tp),))


def parse_space(config_cls: type, specs: dict[str, str] | list[str]) -> list[Dimension]:
    """``["key=spec", ...]`` or ``{key: spec}`` -> dimensions, validated."""
    if isinstance(specs, list):
        pairs = {}
        for item in specs:
            if "=" not in item:
                raise ConfigError(f"--space {item!r}: expected KEY=SPEC, e.g. window=[30,60,90]")
            key, spec = item.split("=", 1)
            pairs[key.strip()] = spec
        specs = pairs
    return [parse_dimension(config_cls, k, v) for k, v in specs.items()]

"""One check of timm model names, with one message, for every config that names a model."""

from __future__ import annotations

import difflib

import timm

from raylab.errors import ConfigError


def check_timm_model(name: str, key: str | None = "model") -> None:
    """Raise a ConfigError naming ``key`` (a config key, or None) and the closest timm
    names by spelling (difflib) when ``name`` is not a timm model (a ``.tag`` suffix is
    allowed)."""
    arch = str(name).split(".")[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    where = f"config key {key!r}: " if key else ""
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"{where}{name!r} is not a timm model{hint}")

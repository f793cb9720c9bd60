"""One check of timm model names, with one message, for every config that names a model."""

from __future__ import annotations

import timm

from raylab.errors import ConfigError


def check_timm_model(name: str, key: str | None = "model") -> None:
    """Raise a ConfigError naming ``key`` (a config key, or None) and some close names
    when ``name`` is not a timm model (a ``.tag`` suffix is allowed)."""
    arch = str(name).split(".")[0]
    if timm.is_model(arch):
        return
    family = arch.split("_")[0]
    close = timm.list_models(f"*{family}*")[:8] if family else []
    where = f"config key {key!r}: " if key else ""
    hint = f"; e.g. {', '.join(close)}" if close else ""
    raise ConfigError(f"{where}{name!r} is not a timm model{hint}")

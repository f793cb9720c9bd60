"""One module per paper. Each registers itself with :func:`raylab.registry.register_method`."""

from typing import Any


def load_backbone(checkpoint: Any, which: str = "teacher") -> Any:
    """A trained DINO teacher (or student) backbone as a frozen feature extractor.

    See :func:`raylab.methods.dino.load_backbone`; imported lazily so that
    ``import raylab.methods`` stays light.
    """
    from raylab.methods.dino import load_backbone as _load

    return _load(checkpoint, which)


__all__ = ["load_backbone"]

"""One package per paper (``raylab/methods/<name>/``), each registering one method.

:mod:`.base` is what they share: the driver-side flow of ``train`` and Tune trials.
"""

from typing import Any


def load_backbone(checkpoint: Any, which: str = "teacher") -> Any:
    """A trained DINO teacher (or student) backbone as a frozen feature extractor.

    See :func:`raylab.models.backbones.load_backbone`; imported lazily so that
    ``import raylab.methods`` stays light.
    """
    from raylab.models.backbones import load_backbone as _load

    return _load(checkpoint, which)


__all__ = ["load_backbone"]

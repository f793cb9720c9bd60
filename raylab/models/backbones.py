"""Trained backbones as frozen feature extractors, for any method that reuses one.

A DINO checkpoint (``raylab train dino``) holds the student (``model``) and the teacher
(``ema``) with the config that built them; :func:`load_backbone` rebuilds the timm backbone
and loads its weights. CLEAR's "unsupervised representation" rows use it today; STEGO and
frozen-backbone detection will.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from raylab.engine.checkpoint import load_checkpoint, load_meta
from raylab.errors import CheckpointError
from raylab.models.dino import build_backbone

#: Methods whose checkpoints hold a backbone under ``backbone.`` in their weights.
BACKBONE_METHODS = ("dino",)


def backbone_from_config(config: dict[str, Any], drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised backbone as a DINO config (a dict) describes it."""
    extra = {} if config.get("depth") is None else {"depth": int(config["depth"])}
    return build_backbone(config["arch"], int(config["img_size"]), config.get("patch_size"),
                          drop_path_rate=drop_path_rate, **extra)


def load_backbone(checkpoint: str | Path, which: str = "teacher") -> nn.Module:
    """A trained DINO backbone as a frozen feature extractor (eval mode, no gradients).

    The returned timm model has ``forward_features`` (token/feature maps) and its
    ``forward`` returns pooled features (``num_classes=0``).

    Args:
        checkpoint: A DINO checkpoint folder (``state.pt`` + ``meta.json``).
        which: ``"teacher"`` (what the paper evaluates) or ``"student"``.

    Raises:
        CheckpointError: Not a DINO checkpoint, no such weights, or weights that do not
            fit the saved config's backbone.
    """
    meta = load_meta(checkpoint)
    if meta.get("method") not in BACKBONE_METHODS:
        raise CheckpointError(f"{checkpoint}: not a DINO checkpoint (method "
                              f"{meta.get('method')!r})")
    state = load_checkpoint(checkpoint)
    weights = state.get("ema" if which == "teacher" else "model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{checkpoint}: holds no {which} weights")
    prefix = "backbone."
    config = meta.get("config") or {}
    try:
        backbone = backbone_from_config(config)
    except KeyError as exc:
        raise CheckpointError(f"{checkpoint}: meta.json's config has no {exc}") from None
    try:
        backbone.load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                  if k.startswith(prefix)})
    except RuntimeError as exc:  # shapes or names that do not fit the saved config
        lines = str(exc).strip().splitlines()
        why = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{checkpoint}: the {which} weights do not fit a "
                              f"{config.get('arch')} backbone ({why})") from None
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone

"""Trained backbones for any method that reuses one.

A DINO checkpoint (``raylab train dino``) holds the student (``model``) and the teacher
(``ema``) with the config that built them; :func:`load_backbone` rebuilds the timm backbone
and loads its weights (CLEAR's "unsupervised representation" rows use it).
:func:`pretrained_weights` reads the backbone weights of a DINO *or* a classifier run
(``raylab train convnext``: a whole timm model, with its EMA copy when the run kept one)
for a model that holds the same timm network under other names (the detection backbones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raylab.engine.checkpoint import load_checkpoint, load_meta
from raylab.errors import CheckpointError
from raylab.models.dino import build_backbone

#: Methods whose checkpoints hold a backbone under ``backbone.`` in their weights.
BACKBONE_METHODS = ("dino",)
#: Methods whose checkpoints hold a whole timm classifier, named by ``config["model"]``.
CLASSIFIER_METHODS = ("convnext", "minivit")
#: ``which`` -> the state key: the averaged copy (DINO's teacher is its EMA) or the trained
#: model (DINO's student). ``auto`` takes the averaged copy when the run kept one.
WEIGHT_KEYS = {"teacher": "ema", "ema": "ema", "student": "model", "model": "model"}
WHICH = ("auto", *WEIGHT_KEYS)


@dataclass
class PretrainedWeights:
    """A backbone's weights as its timm model names them (no ``backbone.`` prefix)."""

    method: str
    arch: str
    which: str
    state: dict[str, torch.Tensor]
    #: The run's config (meta.json), which rebuilds the network.
    config: dict[str, Any]


def pretrained_weights(checkpoint: str | Path, which: str = "auto") -> PretrainedWeights:
    """The backbone weights of a raylab DINO or classifier checkpoint (or its ``model``
    export).

    Args:
        which: ``auto`` (the EMA/teacher copy when saved, else the trained model),
            ``teacher``/``ema`` or ``student``/``model``.

    Raises:
        CheckpointError: Neither kind of checkpoint, or no such weights in it.
    """
    if which not in WHICH:
        raise CheckpointError(f"backbone weights must be one of {list(WHICH)}, got {which!r}")
    meta = load_meta(checkpoint)
    method = meta.get("method")
    if method not in BACKBONE_METHODS + CLASSIFIER_METHODS:
        raise CheckpointError(f"{checkpoint}: method {method!r} holds no backbone to reuse "
                              f"(one of {list(BACKBONE_METHODS + CLASSIFIER_METHODS)})")
    config = meta.get("config") or {}
    arch = config.get("arch" if method in BACKBONE_METHODS else "model")
    if not arch:
        raise CheckpointError(f"{checkpoint}: meta.json's config names no model")
    state = load_checkpoint(checkpoint)
    key = WEIGHT_KEYS.get(which) or ("ema" if isinstance(state.get("ema"), dict) else "model")
    weights = state.get(key)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{checkpoint}: holds no {key} weights (the run kept none); "
                              f"ask for the trained model's (model/student)")
    if method in BACKBONE_METHODS:
        prefix = "backbone."
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return PretrainedWeights(method=method, arch=str(arch), which=key, state=weights,
                             config=config)


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
    weights = pretrained_weights(checkpoint, which)
    if weights.method not in BACKBONE_METHODS:
        raise CheckpointError(f"{checkpoint}: not a DINO checkpoint (method "
                              f"{weights.method!r})")
    try:
        backbone = backbone_from_config(weights.config)
    except KeyError as exc:
        raise CheckpointError(f"{checkpoint}: meta.json's config has no {exc}") from None
    try:
        backbone.load_state_dict(weights.state)
    except RuntimeError as exc:  # shapes or names that do not fit the saved config
        lines = str(exc).strip().splitlines()
        why = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{checkpoint}: the {which} weights do not fit a "
                              f"{weights.arch} backbone ({why})") from None
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
